"""Quire limb rows in sign-magnitude form, for sending only the columns values occupy."""

from numba import njit, prange

from .accumulate import LIMB, LIMB_MASK


@njit(parallel=True, cache=True)
def sign_magnitude(limbs, out):
    """out[i] = the digits of |row i| (as ``normalize`` leaves them: all but the top limb
    in [0, 2**LIMB)), each negated for a negative row. Rows of ``limbs`` are normalised
    (top limb signed); a nonnegative row is copied as it is. Sums of such rows are exact."""
    rows, nl = limbs.shape
    for i in prange(rows):
        neg = limbs[i, nl - 1] < 0
        carry = 0
        for col in range(nl):
            x = (-limbs[i, col] if neg else limbs[i, col]) + carry
            if col < nl - 1:
                carry = x >> LIMB
                x = x & LIMB_MASK
            out[i, col] = -x if neg else x
