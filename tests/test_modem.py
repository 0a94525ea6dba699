"""The 4G modem driver: PDU encoding against published examples and round trips, and the
AT dialogue against the simulator on a real pseudo-terminal."""

from __future__ import annotations

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modem import Modem, ModemError, ModemTimeout, SmsRefused, decode_submit, encode_submit
from drivers.modem.at import AtChannel
from drivers.modem.pdu import gsm7_septets, pack_septets, reassemble
from tests.support.modem_sim import ModemSimulator, SimulatedModemState

# -- PDU ---------------------------------------------------------------------------------


def test_septet_packing_of_the_classic_example():
    # "hellohello" packed into octets: the worked example of the PDU-mode literature.
    assert pack_septets(gsm7_septets("hellohello")).hex().upper() == "E8329BFD4697D9EC37"


def test_whole_submit_pdu_matches_the_published_example():
    # SMSC from the SIM (00), SUBMIT with relative validity (11), MR 00, +46708251358,
    # PID 00, DCS 00, VP AA (4 days), 10 septets.
    [part] = encode_submit("+46708251358", "hellohello", validity=0xAA)
    assert part.hex == "0011000B916407281553F80000AA0AE8329BFD4697D9EC37"
    assert part.tpdu_length == len(part.hex) // 2 - 1  # AT+CMGS counts without the SMSC


def test_chinese_goes_as_ucs2_and_a_national_number_is_unknown_type():
    [part] = encode_submit("13800138000", "你好")
    assert part.hex == "0011000B813108108300F00008A7044F60597D"
    decoded = decode_submit(part.hex)
    assert (decoded.number, decoded.dcs, decoded.text) == ("13800138000", 0x08, "你好")


def test_extension_characters_take_two_septets_and_are_never_cut():
    assert gsm7_septets("€") == [0x1B, 0x65]
    text = "a" + "€" * 100  # 201 septets: two parts, the cut falls inside a pair
    parts = encode_submit("+1", text)
    assert len(parts) == 2
    decoded = [decode_submit(p.hex) for p in parts]
    assert decoded[0].text == "a" + "€" * 76 and reassemble(decoded) == text


def test_chinese_longer_than_70_characters_is_split_and_reassembles():
    text = ("【校园一键报警】南门岗亭于2026-11-24 08:15:02触发紧急报警，"
            "110平台10秒内未确认，请立即处置。") * 3
    parts = encode_submit("+8613800138000", text)
    decoded = [decode_submit(p.hex) for p in parts]
    assert len(parts) == -(-len(text) // 67) and all(len(d.text) <= 67 for d in decoded)
    assert {d.reference for d in decoded} == {decoded[0].reference}
    assert [(d.sequence, d.total) for d in decoded] == [(i, len(parts))
                                                        for i in range(1, len(parts) + 1)]
    assert reassemble(list(reversed(decoded))) == text
    assert len(encode_submit("+1", "中" * 70)) == 1 and len(encode_submit("+1", "中" * 71)) == 2


def _user_data_length(pdu_hex: str) -> int:
    decoded = decode_submit(pdu_hex)
    # TPDU: first, MR, DA (2 + digits/2), PID, DCS, VP, UDL, then the user data.
    header = 2 + 2 + (len(decoded.number.removeprefix("+")) + 1) // 2 + 3 + 1
    return decoded.tpdu_length - header


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=700), st.sampled_from(["+8613800138000", "10086"]))
def test_any_text_round_trips_and_no_part_exceeds_140_octets(text, number):
    parts = encode_submit(number, text)
    decoded = [decode_submit(p.hex) for p in parts]
    assert reassemble(decoded) == text
    assert all(d.number == number for d in decoded)
    assert all(_user_data_length(p.hex) <= 140 for p in parts)
    if len(parts) > 1:
        assert all(d.total == len(parts) for d in decoded)


# -- the AT dialogue --------------------------------------------------------------------


@pytest.fixture
def sim():
    with ModemSimulator() as running:
        yield running


def test_initialises_a_module_that_echoes_and_reads_its_state(sim):
    with Modem.open_port(sim.port) as modem:
        assert sim.commands[:4] == ["AT", "ATE0", "AT+CMEE=1", "AT+CMGF=0"]
        status = modem.status()
        assert (status.present, status.sim, status.registration) == (True, "READY", "home")
        assert (status.signal_csq, status.signal_dbm, status.operator) == (20, -73,
                                                                           "CHINA MOBILE")
        assert status.problems == []


def test_no_sim_no_network_and_unknown_signal_are_problems(sim):
    with Modem.open_port(sim.port) as modem:
        sim.set(sim="absent")
        status = modem.status()
        assert status.sim == "not inserted" and status.problems == ["SIM not inserted"]
        sim.set(sim="READY", registration=2, csq=99)
        status = modem.status()
        assert status.registration == "searching" and status.signal_dbm is None
        assert status.problems == ["not registered on the network (searching)"]
        sim.set(registration=5)
        assert modem.status().registration == "roaming"
        sim.set(registration=3)
        assert modem.registration() == "denied"


def test_pin_wrong_then_right(sim):
    sim.set(sim="SIM PIN", pin="4321")
    with Modem.open_port(sim.port) as modem:
        assert modem.sim_state().state == "SIM PIN"
        with pytest.raises(ModemError) as wrong:
            modem.enter_pin("1111")
        assert (wrong.value.kind, wrong.value.code) == ("CME", 16)
        assert "incorrect password" in str(wrong.value)
        assert "1111" not in str(wrong.value) and wrong.value.command == "AT+CPIN=***"
        modem.enter_pin("4321")
        assert modem.sim_state().ready


def test_sends_a_short_and_a_long_chinese_sms(sim):
    with Modem.open_port(sim.port) as modem:
        short = modem.send_sms("+8613800138000", "Gate alarm 1")
        text = "紧急报警" * 40  # 160 characters: three UCS-2 parts
        long = modem.send_sms("13900139000", text)
        assert short.parts == 1 and long.parts == 3
        assert short.references == [1] and long.references == [2, 3, 4]
        assert sorted(sim.wait_for_messages(2)) == sorted(
            [("+8613800138000", "Gate alarm 1"), ("13900139000", text)])


def test_error_answers_raise_with_their_codes(sim):
    with Modem.open_port(sim.port) as modem:
        sim.set(fail_sends=1, send_error=38)
        with pytest.raises(ModemError) as failed:
            modem.send_sms("+8613800138000", "x")
        assert (failed.value.kind, failed.value.code) == ("CMS", 38)
        assert "network out of order" in str(failed.value)
        sim.set(registration=0)
        with pytest.raises(ModemError) as no_network:
            modem.send_sms("+8613800138000", "紧急" * 40)
        assert no_network.value.code == 331 and "part 1 of 2" in str(no_network.value)
        with pytest.raises(ModemError) as unknown:
            modem.channel.command("AT+QNOSUCH")
        assert unknown.value.answer == "ERROR" and unknown.value.code is None
        sim.set(registration=1)
        assert modem.send_sms("+8613800138000", "ok").parts == 1  # and it recovers


def test_slow_answers_are_waited_for_and_a_dead_module_times_out(sim):
    port = serial.Serial(sim.port, 115200, timeout=0.5)
    channel = AtChannel(port, timeout=3)
    try:
        sim.set(reply_delay=0.3)
        assert channel.command("AT+CSQ").value("+CSQ:") == "20,99"
        sim.set(reply_delay=0, dead=True)
        with pytest.raises(ModemTimeout) as timed_out:
            channel.command("AT", timeout=0.3)
        assert "no answer within 0.3 s" in str(timed_out.value)
    finally:
        port.close()


def test_unsolicited_codes_during_a_command_are_set_aside(sim):
    with Modem.open_port(sim.port) as modem:
        sim.set(urc_before_reply='+CMTI: "SM",3')
        assert modem.signal().csq == 20
        sim.set(urc_before_reply="+CREG: 1")
        assert modem.sim_state().ready
        assert modem.channel.unsolicited == ['+CMTI: "SM",3', "+CREG: 1"]


def test_an_absent_port_is_a_clear_error(tmp_path):
    with pytest.raises(ModemError) as absent:
        Modem.open_port(str(tmp_path / "ttyUSB9"))
    assert "cannot open" in str(absent.value)


def test_simulator_state_defaults_are_a_working_module():
    state = SimulatedModemState()
    assert (state.sim, state.registration, state.csq) == ("READY", 1, 20)


def test_a_modem_unplugged_mid_command_is_a_modem_error_then_and_after(sim):
    with Modem.open_port(sim.port) as modem:
        sim.set(hang_up_on="AT+CSQ")  # the USB modem vanishes while it is asked for signal
        with pytest.raises(ModemError) as during:
            modem.signal()
        assert "serial port" in str(during.value)
        # The next command meets the dead port at once (termios.error from the flush).
        with pytest.raises(ModemError):
            modem.sim_state()
        with pytest.raises(ModemError):
            modem.send_sms("+8613800138000", "x")


def test_the_send_prompt_is_awaited_past_unsolicited_codes_and_an_error_keeps_its_code(sim):
    with Modem.open_port(sim.port) as modem:
        sim.set(urc_before_reply='+CMTI: "SM",3')  # a message arrives as we send ours
        assert modem.send_sms("+8613800138000", "first").parts == 1
        sim.set(urc_before_reply="+CREG: 1")
        modem.channel.command("ATE1")  # a module that echoes (it was reset behind our back)
        assert modem.send_sms("+8613800138000", "second").parts == 1
        assert modem.channel.unsolicited == ['+CMTI: "SM",3', "+CREG: 1"]
        assert sim.wait_for_messages(2) == [("+8613800138000", "first"),
                                            ("+8613800138000", "second")]
        sim.set(sim="absent")  # the SIM falls out: an error comes instead of the prompt
        with pytest.raises(ModemError) as no_sim:
            modem.send_sms("+8613800138000", "third")
        assert (no_sim.value.kind, no_sim.value.code) == ("CMS", 310)
        assert "SIM not inserted" in str(no_sim.value)


def test_a_garbled_answer_is_a_modem_error_not_a_crash(sim):
    with Modem.open_port(sim.port) as modem:
        for command, line in (("AT+CSQ", "+CSQ: --,99"), ("AT+CEREG?", "+CEREG: 0,x")):
            sim.set(garbled={command: line})
            with pytest.raises(ModemError) as garbled:
                modem.status()
            assert str(garbled.value).startswith(f"{command}: unreadable answer")
        sim.set(garbled={})
        assert modem.status().problems == []


def test_a_late_answer_is_not_taken_for_the_next_commands(sim):
    with Modem.open_port(sim.port, command_timeout=0.3) as modem:
        # A module that stops answering is not "unregistered" nor "of unknown model".
        sim.set(dead=True)
        with pytest.raises(ModemTimeout):
            modem.registration()
        with pytest.raises(ModemTimeout):
            modem.model()
        sim.set(dead=False)
    port = serial.Serial(sim.port, 115200, timeout=0.5)
    channel = AtChannel(port, timeout=5)
    try:
        sim.set(reply_delay=1)  # it answers, but after the command's time
        with pytest.raises(ModemTimeout):
            channel.command("AT+CEREG?", timeout=0.3)
        sim.set(reply_delay=0)
        assert channel.command("AT+CGMM").lines == ["EC25"]
        assert channel.command("AT+CSQ").value("+CSQ:") == "20,99"
    finally:
        port.close()


def test_a_module_left_waiting_for_message_text_is_brought_back_at_the_next_open(sim):
    # A daemon killed between AT+CMGS and its Ctrl-Z: the module takes whatever comes
    # next as the message's text, "AT" included, and answers nothing.
    port = serial.Serial(sim.port, 115200, timeout=10)
    try:
        port.write(b"AT+CMGS=19\r")
        assert port.read_until(b"> ").endswith(b"> ")
    finally:
        port.close()
    with Modem.open_port(sim.port, command_timeout=1) as modem:
        assert modem.send_sms("+8613800138000", "after the restart").parts == 1
    assert sim.wait_for_messages(1) == [("+8613800138000", "after the restart")]


def test_the_owner_hears_from_the_driver_after_every_part_of_a_long_sms(sim):
    beats: list[int] = []  # how many parts the module had accepted at each heartbeat
    with Modem.open_port(sim.port, heartbeat=lambda: beats.append(len(sim.sent))) as modem:
        assert modem.send_sms("13900139000", "紧急报警" * 40).parts == 3
    # Each part's wait (up to modem.sms_timeout_s) ends in a beat before the next part.
    assert {1, 2, 3} <= set(beats)


def test_a_refused_message_is_told_apart_from_a_module_that_cannot_send(sim):
    with Modem.open_port(sim.port) as modem:
        sim.set(fail_sends=1, send_error=42)  # congestion: the network turned this one down
        with pytest.raises(SmsRefused) as refused:
            modem.send_sms("+8613800138000", "x")
        assert refused.value.code == 42
        sim.set(registration=0)  # no network: nothing was offered to it
        with pytest.raises(ModemError) as no_network:
            modem.send_sms("+8613800138000", "x")
        assert no_network.value.code == 331 and not isinstance(no_network.value, SmsRefused)
        sim.set(registration=1, sim="absent")  # no SIM: an error instead of the prompt
        with pytest.raises(ModemError) as no_sim:
            modem.send_sms("+8613800138000", "x")
        assert no_sim.value.code == 310 and not isinstance(no_sim.value, SmsRefused)
