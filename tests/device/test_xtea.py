from dt import Rng, raises
from vec_xtea import (
    BOOT_CIPHER,
    BOOT_KEY,
    BOOT_PASSWORD,
    BOTAN,
    ECB_CIPHER,
    ECB_KEY,
    ECB_PLAIN,
    PUBLISHED,
)

from microcot import xtea

H = bytes.fromhex


def test_published_vectors_encrypt_and_decrypt():
    for k, p, c in PUBLISHED + BOTAN:
        assert xtea.encrypt_block(H(k), H(p)) == H(c), (k, p)
        assert xtea.decrypt_block(H(k), H(c)) == H(p), (k, c)


def test_ecb_multi_block_vector():
    k = H(ECB_KEY)
    assert xtea.encrypt_ecb(k, H(ECB_PLAIN)) == H(ECB_CIPHER)
    assert xtea.decrypt_ecb(k, H(ECB_CIPHER)) == H(ECB_PLAIN)
    assert xtea.encrypt_ecb_py(k, H(ECB_PLAIN)) == H(ECB_CIPHER)
    assert xtea.decrypt_ecb_py(k, H(ECB_CIPHER)) == H(ECB_PLAIN)


def test_ecb_is_blockwise():
    k = H(PUBLISHED[0][0])
    c = xtea.encrypt_ecb(k, H(PUBLISHED[0][1] + PUBLISHED[1][1]))
    assert c == H(PUBLISHED[0][2] + PUBLISHED[1][2])
    assert xtea.encrypt_ecb(k, b"") == b""


def test_bootstrap_answer_decrypts_to_password():
    plain = xtea.unpad(xtea.decrypt_ecb(BOOT_KEY.encode(), H(BOOT_CIPHER)))
    assert plain == BOOT_PASSWORD.encode()
    # a str key is its UTF-8 bytes
    assert xtea.encrypt_ecb(BOOT_KEY, xtea.pad(BOOT_PASSWORD.encode())) == H(BOOT_CIPHER)


def test_roundtrip_random():
    r = Rng(7)
    for n in (0, 8, 16, 64, 200):
        k = r.bytes(16)
        d = r.bytes(n - n % 8)
        c = xtea.encrypt_ecb(k, d)
        assert len(c) == len(d)
        assert xtea.decrypt_ecb(k, c) == d


def test_viper_and_pure_agree():
    r = Rng(11)
    if xtea.variant() != "viper":
        raises(OSError, xtea.encrypt_ecb_viper, bytes(16), bytes(8))
        return
    for _ in range(8):
        k = r.bytes(16)
        d = r.bytes(8 * (1 + r.below(12)))
        c = xtea.encrypt_ecb_py(k, d)
        assert xtea.encrypt_ecb_viper(k, d) == c
        assert xtea.decrypt_ecb_viper(k, c) == d
        assert xtea.decrypt_ecb_py(k, c) == d
    # bytearray and memoryview input, and all-ones words (carries out of 32 bits)
    k = b"\xff" * 16
    d = b"\xff" * 16
    assert xtea.encrypt_ecb_viper(k, bytearray(d)) == xtea.encrypt_ecb_py(k, d)
    assert xtea.encrypt_ecb_viper(k, memoryview(d)) == xtea.encrypt_ecb_py(k, d)


def test_key_and_length_errors():
    e = raises(ValueError, xtea.encrypt_ecb, bytes(15), bytes(8))
    assert "16 bytes" in str(e) and "15" in str(e)
    raises(ValueError, xtea.decrypt_ecb, bytes(17), bytes(8))
    raises(ValueError, xtea.encrypt_block, bytes(16), bytes(7))
    raises(ValueError, xtea.decrypt_block, bytes(16), bytes(9))
    e = raises(ValueError, xtea.encrypt_ecb, bytes(16), bytes(12))
    assert "multiple of 8" in str(e)
    raises(ValueError, xtea.decrypt_ecb, bytes(16), bytes(1))
    raises(ValueError, xtea.encrypt_ecb_py, bytes(16), bytes(3))


def test_pad_lengths():
    for n in range(18):
        d = bytes(range(n))
        p = xtea.pad(d)
        assert len(p) % 8 == 0 and len(d) < len(p) <= len(d) + 8
        k = 8 - n % 8
        assert p[n:] == bytes((k,)) * k
        assert xtea.unpad(p) == d


def test_unpad_errors_name_the_defect():
    e = raises(ValueError, xtea.unpad, b"")
    assert "empty" in str(e)
    e = raises(ValueError, xtea.unpad, b"abc\x01")
    assert "multiple of 8" in str(e)
    e = raises(ValueError, xtea.unpad, b"abcdefg\x00")
    assert "last byte 0" in str(e)
    e = raises(ValueError, xtea.unpad, b"abcdefg\x09")
    assert "last byte 9" in str(e)
    e = raises(ValueError, xtea.unpad, b"abcde\x02\x03\x03")
    assert "offset 5" in str(e)
    assert xtea.unpad(b"\x08" * 8) == b""
    assert xtea.unpad(b"abcdefg\x01") == b"abcdefg"
