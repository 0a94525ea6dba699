"""The 4G modem of the SMS second path: AT commands over pyserial, SMS in PDU mode."""

from drivers.modem.at import AtChannel, ModemError, ModemTimeout, UnreadableAnswer
from drivers.modem.modem import Modem, ModemStatus, SimState, SmsRefused, SmsResult
from drivers.modem.pdu import decode_submit, encode_submit, reassemble

__all__ = ["AtChannel", "Modem", "ModemError", "ModemStatus", "ModemTimeout", "SimState",
           "SmsRefused", "SmsResult", "UnreadableAnswer", "decode_submit", "encode_submit",
           "reassemble"]
