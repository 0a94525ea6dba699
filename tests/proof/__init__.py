"""The proof suite (issue 12): the whole device under faults, judged from the broker side."""
