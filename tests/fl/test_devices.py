import pytest

from edge_runtime.checkpoints import tiny_config
from edge_runtime.fl.devices import DeviceClass, analytic_cost, load_device_classes
from edge_runtime.fl.legend import predict_time
from edge_runtime.profiler.profile_io import ProfileError


def test_costs_scale_with_speed_and_count_lora_flops():
    cfg = tiny_config()  # dim 64, 4 heads of 16, 2 kv heads, hidden 128
    slow = DeviceClass("slow", 1000, 10.0, 5.0)
    fast = DeviceClass("fast", 1000, 40.0, 5.0)
    a = analytic_cost(cfg, slow, batch=2, seq_len=32, targets=("q_proj", "v_proj"))
    b = analytic_cost(cfg, fast, batch=2, seq_len=32, targets=("q_proj", "v_proj"))
    assert a.fwd_s == pytest.approx(4 * b.fwd_s) and a.bwd_s == pytest.approx(4 * b.bwd_s)
    # one rank unit of q (64 -> 64) and v (64 -> 32): 6 FLOPs per parameter per token
    assert a.rank_s == pytest.approx(6 * 64 * ((64 + 64) + (64 + 32)) / 10e9)
    assert a.mem_budget_mb == 1000
    assert predict_time(a, 2, [4, 8], 10) > predict_time(a, 2, [4], 10)


def test_declared_classes_load_by_name():
    classes = load_device_classes(("rpi4-2gb", "android-flagship-12gb"))
    assert [c.name for c in classes] == ["rpi4-2gb", "android-flagship-12gb"]
    assert classes[1].fp32_gflops > classes[0].fp32_gflops
    with pytest.raises(ProfileError, match="no declared device profile"):
        load_device_classes(("toaster",))
