"""Print the ``ATEN_CPU_CAPABILITY`` that `make test` runs the alignment checks under a second time:
``avx2`` on a machine whose default kernels are AVX-512, else ``default`` (the scalar kernels).

PyTorch picks its CPU kernels by instruction set, so bf16 (and some fp32) results differ in the
last bits between machines of one kind; running the checks under a second capability makes an
ISA-dependent assertion fail on every machine."""

import torch

print("avx2" if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512") else "default")
