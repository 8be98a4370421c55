"""The device agent's re-send back-off (the agent's MQTT behaviour: test_faults.py)."""

from __future__ import annotations

from edge_runtime.fleet.agent import resend_after


def test_resend_backs_off_to_eight_times_the_ack_timeout() -> None:
    # a busy aggregator acks in queue order: re-sending the whole update every 10 s only
    # queues it again (bench_fleet_load.py at 1,000 devices)
    assert [resend_after(10.0, k) for k in range(1, 7)] == [10, 20, 40, 80, 80, 80]
    assert resend_after(2.5, 0) == 2.5  # never sent yet: the plain timeout
