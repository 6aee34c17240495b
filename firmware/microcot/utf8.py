# Strict UTF-8 (RFC 3629): MicroPython's decoder lets surrogates and some malformed sequences
# through where CPython's refuses them, so both runtimes take this module's word. Imported only
# for bytes that are not ASCII (smartrest, binrest), to keep it off the heap of an agent that
# never sees any.

# the second byte of a 3- or 4-byte sequence, by its lead byte, where it is narrower than 80..BF:
# no overlong forms, no surrogates (ED A0..BF), nothing past U+10FFFF (RFC 3629, section 4)
_SECOND = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def bad(b):
    """The index of the first byte of b that breaks UTF-8, or -1."""
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            k = 1
        elif 0xE0 <= c <= 0xEF:
            k = 2
        elif 0xF0 <= c <= 0xF4:
            k = 3
        else:
            return i
        lo, hi = _SECOND.get(c, (0x80, 0xBF))
        if i + 1 >= n or not lo <= b[i + 1] <= hi:
            return i
        for j in range(i + 2, i + k + 1):
            if j >= n or b[j] & 0xC0 != 0x80:
                return i
        i += k + 1
    return -1
