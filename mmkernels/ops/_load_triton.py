"""The triton backend's load step. Importing this module imports the Triton kernels (which define
mmkernels::triton_<op>_fwd/_bwd) and registers each op's fake kernels and autograd for them, once.
An import rather than a call, so that a first call under torch.compile(fullgraph=True) runs it too:
dynamo executes imports, where it would refuse to trace importlib."""
from mmkernels.ops._autograd import REGISTER
from mmkernels.triton import cross_modal_attention, gated_fusion  # noqa: F401  (define the ops)

for _op, _register in REGISTER.items():
    _register(f"triton_{_op}_fwd", f"triton_{_op}_bwd")
