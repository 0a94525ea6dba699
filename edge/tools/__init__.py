"""The commands around the daemons: cli, demo, watch, status, doctor, provision, report."""
