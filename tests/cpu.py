"""What tests need to know of the CPU they run on: bf16 paths are tested where the CPU multiplies bf16 natively
(AVX512-BF16 or AMX, and neither torch nor oneDNN held below it); their fp32 fallbacks are tested everywhere."""

import pytest

from rlhf.train.common import cpu_has_bf16

needs_native_bf16 = pytest.mark.skipif(
    not cpu_has_bf16(),
    reason="a bf16 path: taken only where the CPU multiplies bf16 natively; emulated here (fp32 is chosen)",
)
