"""XTEA block cipher (Needham/Wheeler 1997) as Cloud of Things bootstrap uses it.

32 cycles (64 Feistel rounds), delta 0x9E3779B9, the 8-byte block and the 16-byte key read as
big-endian 32-bit words; the key is used as-is (the bootstrap secret's 16 ASCII bytes).
ECB over whole 8-byte blocks, PKCS#7 padding to 8 bytes.

    encrypt_block(key, block) / decrypt_block(key, block)   one 8-byte block
    encrypt_ecb(key, data) / decrypt_ecb(key, data)         len(data) % 8 == 0
    pad(data) / unpad(data)                                 PKCS#7, block size 8

On MicroPython the ECB functions use a viper loop when the port has the native emitter
(see `variant()`); `encrypt_ecb_py` / `decrypt_ecb_py` are the pure-Python versions, which
CPython always runs. Every error is a ValueError that names what was wrong.
"""

from struct import pack_into, unpack, unpack_from

DELTA = 0x9E3779B9
BLOCK = 8
_M = 0xFFFFFFFF


def _key_words(key):
    if isinstance(key, str):
        key = key.encode()
    if len(key) != 16:
        raise ValueError("XTEA key must be 16 bytes, got %d" % len(key))
    return unpack(">4I", key)


def _schedule(key):
    # The two round keys of every cycle, (sum + k[sum & 3], sum' + k[sum' >> 11 & 3]), computed once
    # per call rather than 64 times per block. Not cached across calls on purpose: the bootstrap key
    # is a secret and should not outlive the call in a module global.
    k = _key_words(key)
    rk = []
    s = 0
    for _ in range(32):
        a = (s + k[s & 3]) & _M
        s = (s + DELTA) & _M
        rk.append((a, (s + k[(s >> 11) & 3]) & _M))
    return rk


def _check_len(data):
    n = len(data)
    if n % BLOCK:
        raise ValueError("XTEA ECB data must be a multiple of 8 bytes, got %d" % n)
    return n


def _enc_py(rk, data, n):
    out = bytearray(n)
    for off in range(0, n, BLOCK):
        v0, v1 = unpack_from(">II", data, off)
        for a, b in rk:
            v0 = (v0 + ((((v1 << 4) ^ (v1 >> 5)) + v1) ^ a)) & _M
            v1 = (v1 + ((((v0 << 4) ^ (v0 >> 5)) + v0) ^ b)) & _M
        pack_into(">II", out, off, v0, v1)
    return bytes(out)


def _dec_py(rk, data, n):
    out = bytearray(n)
    rk = rk[::-1]
    for off in range(0, n, BLOCK):
        v0, v1 = unpack_from(">II", data, off)
        for a, b in rk:
            v1 = (v1 - ((((v0 << 4) ^ (v0 >> 5)) + v0) ^ b)) & _M
            v0 = (v0 - ((((v1 << 4) ^ (v1 >> 5)) + v1) ^ a)) & _M
        pack_into(">II", out, off, v0, v1)
    return bytes(out)


def encrypt_ecb_py(key, data):
    """Pure-Python ECB encryption (the reference the viper variant is checked against)."""
    n = _check_len(data)
    return _enc_py(_schedule(key), data, n)


def decrypt_ecb_py(key, data):
    """Pure-Python ECB decryption."""
    n = _check_len(data)
    return _dec_py(_schedule(key), data, n)


# The viper loop is compiled from source at first use instead of being decorated in this file:
# a module holding @micropython.viper does not compile at all on a port without the native
# emitter, nor cross-compile with mpy-cross unless -march is given. exec() compiles for the running
# CPU and fails cleanly (SyntaxError), leaving the pure-Python path. Words are assembled from bytes
# because ptr32 reads native (little) endian; `& m` keeps 64-bit ports to 32-bit arithmetic and is
# a no-op on 32-bit ones. m is built from small constants because a 32-bit literal would be a
# big-int object on 32-bit ports.
_VIPER_SRC = """
@micropython.viper
def enc(buf: ptr8, n: int, rk: ptr32):
    m = (uint(0xFFFF) << 16) | uint(0xFFFF)
    i = 0
    while i < n:
        v0 = (uint(buf[i]) << 24) | (uint(buf[i + 1]) << 16) | (uint(buf[i + 2]) << 8) | uint(buf[i + 3])
        v1 = (uint(buf[i + 4]) << 24) | (uint(buf[i + 5]) << 16) | (uint(buf[i + 6]) << 8) | uint(buf[i + 7])
        r = 0
        while r < 64:
            v0 = (v0 + ((((v1 << 4) ^ (v1 >> 5)) + v1) ^ uint(rk[r]))) & m
            v1 = (v1 + ((((v0 << 4) ^ (v0 >> 5)) + v0) ^ uint(rk[r + 1]))) & m
            r += 2
        buf[i] = v0 >> 24
        buf[i + 1] = v0 >> 16
        buf[i + 2] = v0 >> 8
        buf[i + 3] = v0
        buf[i + 4] = v1 >> 24
        buf[i + 5] = v1 >> 16
        buf[i + 6] = v1 >> 8
        buf[i + 7] = v1
        i += 8

@micropython.viper
def dec(buf: ptr8, n: int, rk: ptr32):
    m = (uint(0xFFFF) << 16) | uint(0xFFFF)
    i = 0
    while i < n:
        v0 = (uint(buf[i]) << 24) | (uint(buf[i + 1]) << 16) | (uint(buf[i + 2]) << 8) | uint(buf[i + 3])
        v1 = (uint(buf[i + 4]) << 24) | (uint(buf[i + 5]) << 16) | (uint(buf[i + 6]) << 8) | uint(buf[i + 7])
        r = 62
        while r >= 0:
            v1 = (v1 - ((((v0 << 4) ^ (v0 >> 5)) + v0) ^ uint(rk[r + 1]))) & m
            v0 = (v0 - ((((v1 << 4) ^ (v1 >> 5)) + v1) ^ uint(rk[r]))) & m
            r -= 2
        buf[i] = v0 >> 24
        buf[i + 1] = v0 >> 16
        buf[i + 2] = v0 >> 8
        buf[i + 3] = v0
        buf[i + 4] = v1 >> 24
        buf[i + 5] = v1 >> 16
        buf[i + 6] = v1 >> 8
        buf[i + 7] = v1
        i += 8
"""

_vip = None  # None: not tried yet; False: unavailable; else (enc, dec)


def _viper():
    global _vip
    if _vip is None:
        _vip = False
        try:
            import sys

            if sys.implementation.name == "micropython":
                g = {}
                exec(_VIPER_SRC, g)
                _vip = (g["enc"], g["dec"])
        except Exception:  # SyntaxError/NotImplementedError: no native emitter, no exec
            _vip = False
    return _vip


def variant():
    """'viper' when the ECB functions run the viper loop on this port, else 'python'."""
    return "viper" if _viper() else "python"


def _run_viper(fn, key, data):
    from array import array

    n = _check_len(data)
    flat = array("I", bytes(256))  # 'I' is 32 bits on every MicroPython port, 'L' is not
    i = 0
    for a, b in _schedule(key):
        flat[i] = a
        flat[i + 1] = b
        i += 2
    buf = bytearray(data)
    fn(buf, n, flat)
    return bytes(buf)


def encrypt_ecb_viper(key, data):
    """ECB encryption by the viper loop; OSError when this port has no native emitter."""
    v = _viper()
    if not v:
        raise OSError("XTEA viper variant not available on this port")
    return _run_viper(v[0], key, data)


def decrypt_ecb_viper(key, data):
    """ECB decryption by the viper loop; OSError when this port has no native emitter."""
    v = _viper()
    if not v:
        raise OSError("XTEA viper variant not available on this port")
    return _run_viper(v[1], key, data)


def encrypt_ecb(key, data):
    """Encrypt data (a multiple of 8 bytes) block by block; returns bytes."""
    v = _viper()
    if v:
        return _run_viper(v[0], key, data)
    return encrypt_ecb_py(key, data)


def decrypt_ecb(key, data):
    """Decrypt data (a multiple of 8 bytes) block by block; returns bytes."""
    v = _viper()
    if v:
        return _run_viper(v[1], key, data)
    return decrypt_ecb_py(key, data)


def _check_block(block):
    if len(block) != BLOCK:
        raise ValueError("XTEA block must be 8 bytes, got %d" % len(block))


def encrypt_block(key, block):
    """Encrypt one 8-byte block."""
    _check_block(block)
    return _enc_py(_schedule(key), block, BLOCK)


def decrypt_block(key, block):
    """Decrypt one 8-byte block."""
    _check_block(block)
    return _dec_py(_schedule(key), block, BLOCK)


def pad(data):
    """PKCS#7 padding to a multiple of 8 bytes (always 1..8 bytes added)."""
    n = BLOCK - len(data) % BLOCK
    return bytes(data) + bytes((n,)) * n


def unpad(data):
    """Strip PKCS#7 padding; ValueError naming the defect when the padding is not valid."""
    n = len(data)
    if n == 0:
        raise ValueError("bad padding: data is empty")
    if n % BLOCK:
        raise ValueError("bad padding: length %d is not a multiple of 8" % n)
    p = data[n - 1]
    if p < 1 or p > BLOCK:
        raise ValueError("bad padding: last byte %d is not a pad length 1..8" % p)
    for i in range(n - p, n - 1):
        if data[i] != p:
            raise ValueError(
                "bad padding: byte at offset %d is %d, expected %d" % (i, data[i], p)
            )
    return bytes(data[: n - p])
