"""SMS-SUBMIT in PDU mode (3GPP TS 23.040, TS 23.038; AT commands of TS 27.005).

Text mode (``AT+CMGF=1``) cannot carry Chinese reliably across modules, so Guardpost
sends PDUs: GSM 7-bit default alphabet when the whole text fits it, else UCS-2
(UTF-16BE). A text too long for one SMS is split into parts that carry a concatenation
header (IEI 00: 8-bit reference, total, sequence), which the phone reassembles:

    one SMS:   160 septets (7-bit)  or  70 UCS-2 code units
    per part:  153 septets          or  67 UCS-2 code units

An escape pair of the 7-bit extension table, or a UTF-16 surrogate pair, is never cut
across two parts. :func:`decode_submit` reads a PDU back (the modem simulator of the tests
and the round-trip checks use it).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

# TS 23.038 §6.2.1: the default alphabet, by septet value; 0x1B escapes to the extension.
GSM7_BASIC = ("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
              "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM7_EXTENSION = {"\f": 0x0A, "^": 0x14, "{": 0x28, "}": 0x29, "\\": 0x2F, "[": 0x3C,
                  "~": 0x3D, "]": 0x3E, "|": 0x40, "€": 0x65}
ESCAPE = 0x1B
_BASIC_INDEX = {ch: i for i, ch in enumerate(GSM7_BASIC) if i != ESCAPE}
_EXTENSION_CHAR = {v: k for k, v in GSM7_EXTENSION.items()}

DCS_GSM7, DCS_UCS2 = 0x00, 0x08
SINGLE_SEPTETS, PART_SEPTETS = 160, 153
SINGLE_UCS2, PART_UCS2 = 70, 67
MAX_PARTS = 255
VALIDITY_24H = 0xA7  # relative validity: (167 - 143) x 30 min + 12 h = 24 h

_reference = itertools.count(os.urandom(1)[0])


def next_reference() -> int:
    """The concatenation reference of the next long message (8 bits, wraps)."""
    return next(_reference) % 256


@dataclass(frozen=True)
class PduPart:
    hex: str          # the whole PDU, SMSC octet first, as AT+CMGS wants it written
    tpdu_length: int  # the length AT+CMGS=<length> announces: without the SMSC octet


@dataclass(frozen=True)
class DecodedSubmit:
    number: str
    dcs: int
    text: str
    reference: int | None = None  # concatenation: reference, total parts, this part (1-based)
    total: int = 1
    sequence: int = 1
    tpdu_length: int = 0


# -- the two alphabets ---------------------------------------------------------------


def gsm7_septets(text: str) -> list[int] | None:
    """The text as default-alphabet septets (escapes included), or None if it cannot be."""
    septets = []
    for ch in text:
        if ch in _BASIC_INDEX:
            septets.append(_BASIC_INDEX[ch])
        elif ch in GSM7_EXTENSION:
            septets += [ESCAPE, GSM7_EXTENSION[ch]]
        else:
            return None
    return septets


def pack_septets(septets: list[int], fill_bits: int = 0) -> bytes:
    """Pack 7-bit values into octets, least significant bit first (TS 23.038 §6.1.2.1.1),
    after ``fill_bits`` zero bits (which align the text after a user data header)."""
    value, bits, out = 0, fill_bits, bytearray()
    for septet in septets:
        value |= (septet & 0x7F) << bits
        bits += 7
        while bits >= 8:
            out.append(value & 0xFF)
            value >>= 8
            bits -= 8
    if bits:
        out.append(value & 0xFF)
    return bytes(out)


def unpack_septets(data: bytes, count: int, fill_bits: int = 0) -> list[int]:
    value = int.from_bytes(data, "little")
    return [(value >> (fill_bits + 7 * i)) & 0x7F for i in range(count)]


def septets_to_text(septets: list[int]) -> str:
    out, escaped = [], False
    for septet in septets:
        if escaped:
            out.append(_EXTENSION_CHAR.get(septet, " "))
            escaped = False
        elif septet == ESCAPE:
            escaped = True
        else:
            out.append(GSM7_BASIC[septet])
    return "".join(out)


# -- splitting -------------------------------------------------------------------------


def _split_septets(septets: list[int]) -> list[list[int]]:
    if len(septets) <= SINGLE_SEPTETS:
        return [septets]
    parts, start = [], 0
    while start < len(septets):
        end = min(start + PART_SEPTETS, len(septets))
        if end < len(septets) and septets[end - 1] == ESCAPE:
            # Keep the escape with the character it introduces (no extension character
            # is itself 0x1B, so an escape is never the second half of a pair).
            end -= 1
        parts.append(septets[start:end])
        start = end
    return parts


def _split_ucs2(units: bytes) -> list[bytes]:
    count = len(units) // 2
    if count <= SINGLE_UCS2:
        return [units]
    parts, start = [], 0
    while start < count:
        end = min(start + PART_UCS2, count)
        if end < count and 0xD800 <= int.from_bytes(units[2 * end - 2:2 * end], "big") < 0xDC00:
            end -= 1  # a high surrogate stays with its low surrogate
        parts.append(units[2 * start:2 * end])
        start = end
    return parts


# -- addresses -------------------------------------------------------------------------


def _address(number: str) -> bytes:
    digits = number.removeprefix("+")
    if not digits.isdigit() or not 1 <= len(digits) <= 20:
        raise ValueError(f"not a phone number: {number!r}")
    kind = 0x91 if number.startswith("+") else 0x81  # international / unknown numbering
    padded = digits + ("F" if len(digits) % 2 else "")
    swapped = "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    return bytes([len(digits), kind]) + bytes.fromhex(swapped)


def _read_address(data: bytes, at: int) -> tuple[str, int]:
    digits, kind = data[at], data[at + 1]
    octets = (digits + 1) // 2
    raw = data[at + 2:at + 2 + octets].hex().upper()
    number = "".join(raw[i + 1] + raw[i] for i in range(0, len(raw), 2))[:digits]
    return ("+" if kind & 0x70 == 0x10 else "") + number, at + 2 + octets


# -- encoding --------------------------------------------------------------------------


def encode_submit(number: str, text: str, *, reference: int | None = None,
                  validity: int = VALIDITY_24H) -> list[PduPart]:
    """The PDUs of one message to ``number``: one, or the parts of a long message;
    ``validity`` is the relative validity period octet (TS 23.040 §9.2.3.12.1)."""
    if not text:
        raise ValueError("empty message")
    septets = gsm7_septets(text)
    if septets is not None:
        chunks: list = _split_septets(septets)
        dcs = DCS_GSM7
    else:
        chunks = _split_ucs2(text.encode("utf-16-be"))
        dcs = DCS_UCS2
    if len(chunks) > MAX_PARTS:
        raise ValueError(f"message too long: {len(chunks)} parts (at most {MAX_PARTS})")
    concatenated = len(chunks) > 1
    if concatenated and reference is None:
        reference = next_reference()
    parts = []
    for sequence, chunk in enumerate(chunks, start=1):
        udh = bytes([0x05, 0x00, 0x03, reference, len(chunks), sequence]) if concatenated \
            else b""
        if dcs == DCS_GSM7:
            fill = (7 - len(udh) * 8 % 7) % 7
            user_data = udh + pack_septets(chunk, fill)
            length = (len(udh) * 8 + fill) // 7 + len(chunk)  # in septets
        else:
            user_data = udh + chunk
            length = len(user_data)  # in octets
        first_octet = 0x01 | 0x10 | (0x40 if udh else 0)  # SUBMIT, relative validity, UDHI
        tpdu = (bytes([first_octet, 0x00]) + _address(number)
                + bytes([0x00, dcs, validity, length]) + user_data)
        parts.append(PduPart(("00" + tpdu.hex()).upper(), len(tpdu)))
    return parts


# -- decoding --------------------------------------------------------------------------


def decode_submit(pdu_hex: str) -> DecodedSubmit:
    """Read an SMS-SUBMIT PDU (with its SMSC part first) back into its fields."""
    data = bytes.fromhex(pdu_hex)
    at = 1 + data[0]  # skip the SMSC information
    tpdu_length = len(data) - at
    first = data[at]
    if first & 0x03 != 0x01:
        raise ValueError("not an SMS-SUBMIT")
    number, at = _read_address(data, at + 2)  # after first octet and TP-MR
    dcs = data[at + 1]
    vpf = (first >> 3) & 0x03
    at += 2 + {0: 0, 2: 1}.get(vpf, 7)
    length, user_data = data[at], data[at + 1:]
    reference, total, sequence, header = None, 1, 1, b""
    if first & 0x40:
        header = user_data[:1 + user_data[0]]
        ies, i = header[1:], 0
        while i < len(ies):
            iei, size = ies[i], ies[i + 1]
            value = ies[i + 2:i + 2 + size]
            if iei == 0x00:
                reference, total, sequence = value[0], value[1], value[2]
            elif iei == 0x08:
                reference, total, sequence = int.from_bytes(value[:2], "big"), value[2], value[3]
            i += 2 + size
    if dcs & 0x0C == DCS_UCS2:
        text = user_data[len(header):length].decode("utf-16-be", "surrogatepass")
    else:
        header_bits = len(header) * 8
        fill = (7 - header_bits % 7) % 7 if header else 0
        skip = (header_bits + fill) // 7
        text = septets_to_text(unpack_septets(user_data[len(header):], length - skip, fill))
    return DecodedSubmit(number, dcs, text, reference, total, sequence, tpdu_length)


def reassemble(parts: list[DecodedSubmit]) -> str:
    """The text of a concatenated message from its parts, in any order; UCS-2 parts are
    joined before decoding, as a phone does, so a surrogate pair cut in two still joins."""
    ordered = sorted(parts, key=lambda p: p.sequence)
    return "".join(p.text for p in ordered).encode("utf-16", "surrogatepass").decode("utf-16")
