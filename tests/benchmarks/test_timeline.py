"""benchmarks.common.gpu_timeline: the union of kernel intervals and the idle gaps between them."""
from types import SimpleNamespace

from torch.autograd import DeviceType

from benchmarks.common import gpu_timeline


def event(name, start, end, device=DeviceType.CUDA, annotation=False):
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                           is_user_annotation=annotation)


def test_busy_is_the_union_of_overlapping_kernels_and_gaps_are_bucketed():
    events = [event("profiled run", 0, 2000, DeviceType.CPU), event("a", 5, 20), event("b", 10, 30),
              event("c", 31, 50), event("d", 1200, 1300), event("cpu op", 40, 900, DeviceType.CPU),
              event("profiled run", 3, 1310), event("a user range", 0, 2000, annotation=True)]   # ranges on the GPU
    t = gpu_timeline(events)
    assert t["busy_ms"] == (25 + 19 + 100) / 1e3          # a and b overlap: 5..30 counts once
    assert t["lead_ms"] == 0.005 and t["span_ms"] == 1.3 and t["kernels"] == 4
    assert t["gaps"] == {"<2us": 1, "<10us": 0, "<100us": 0, "<1000us": 0, ">=1000us": 1}
    assert t["idle_ms"][">=1000us"] == 1.15
    assert t["longest"][0] == {"us": 1150, "after": "c", "before": "d"}


def test_no_kernels_no_timeline():
    assert gpu_timeline([event("profiled run", 0, 10, DeviceType.CPU)]) == {}
