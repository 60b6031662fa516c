"""The multi-tensor work table of the Triton kernels (multi_tensor_norms and the fused
optimizer steps): every tensor cut into chunks of ``block`` elements, so that one large
tensor and many small ones both fill the GPU; the chunks' partial sums are reduced per
tensor afterwards, in a fixed order (deterministic)."""

import torch
import triton.language as tl

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class WorkTable:
    """Device tables of one launch over ``sizes`` (elements per tensor): per chunk its
    tensor, start and end (``work``), per tensor its first and past-last chunk and its
    output row (``ranges``)."""

    def __init__(self, sizes, block, device, rows=None):
        work_t, work_s, work_e, first, last = [], [], [], [], []
        for i, n in enumerate(sizes):
            first.append(len(work_t))
            for s in range(0, n, block):
                work_t.append(i)
                work_s.append(s)
                work_e.append(min(s + block, n))
            last.append(len(work_t))
        self.device = device
        self.n_work, self.n_tensors = len(work_t), len(sizes)
        self.work = [self.table(work_t), self.table(work_s), self.table(work_e)]
        self.ranges = [self.table(first), self.table(last),
                       self.table(list(range(len(sizes))) if rows is None else list(rows))]

    def table(self, values, dtype=torch.int64):
        """A host list as a device tensor (one element when empty: a valid pointer)."""
        return torch.tensor(values or [0], dtype=dtype).to(self.device, non_blocking=True)

    def pointers(self, tensors):
        return self.table([t.data_ptr() for t in tensors])
