"""The byte counter of tests/traffic.py, on shapes small enough to count by hand."""
import torch
from traffic import Traffic


def test_traffic_counts_what_torch_ops_move():
    """The counter itself: a cast reads 2 and writes 4 bytes an element, views are free, ``out=`` and
    ``copy_`` write once, an in-place add reads and writes, ``index_fill_`` touches what it fills, an fp32
    accumulation of bf16 operands reads them and its C and writes C once, a gather reads its index and the
    rows it gathers (not its whole source) and writes them."""
    x = torch.empty(10, 8, device="meta", dtype=torch.bfloat16)
    y = torch.empty(10, 8, 8, device="meta")
    index = torch.zeros(5, dtype=torch.long, device="meta")
    with Traffic("meta") as t:
        x.float()
        x.t()[None]
        torch.bmm(y, y, out=torch.empty_like(y))
        y.add_(1.0)
        y.copy_(y)
        y.view(-1).index_fill_(0, index, 0.0)
        torch.baddbmm(y, x.view(10, 8, 1), x.view(10, 1, 8), out_dtype=torch.float32, out=y)
        x[index]
        x.index_select(0, index[:3])
    assert +t.bytes == {"aten::_to_copy": 80 * 6, "aten::bmm": 640 * 4 * 3, "aten::add_": 640 * 4 * 2,
                        "aten::copy_": 640 * 4 * 2, "aten::index_fill_": 5 * 8 + 5 * 4,
                        "aten::baddbmm": 80 * 2 * 2 + 640 * 4 * 2, "aten::index": 5 * 8 + 5 * 8 * 2 * 2,
                        "aten::index_select": 3 * 8 + 3 * 8 * 2 * 2}
