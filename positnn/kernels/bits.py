"""Bit casts between IEEE floats and integers inside numba kernels.

numba has no scalar bitcast, and going through a temporary array costs a full extra pass
over memory; an LLVM ``bitcast`` is free and keeps the loops vectorisable.
"""

from numba import types
from numba.extending import intrinsic


def _bitcast(src, dst):
    @intrinsic
    def cast(typingctx, x):
        if x != src:
            return None
        sig = dst(src)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(dst))

        return sig, codegen

    return cast


f64_as_i64 = _bitcast(types.float64, types.int64)
i64_as_f64 = _bitcast(types.int64, types.float64)
