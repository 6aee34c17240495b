# XTEA test vectors (32 cycles, big-endian), hex (key, plaintext, ciphertext). Shared by the device
# tests and by tests/host/test_cores_props.py, which re-checks every one against the PyPI `xtea`
# package, so a typo here cannot go unnoticed.

# The widely published set (Tom St Denis' libtomcrypt / Bouncy Castle tests).
PUBLISHED = (
    ("000102030405060708090a0b0c0d0e0f", "4142434445464748", "497df3d072612cb5"),
    ("000102030405060708090a0b0c0d0e0f", "4141414141414141", "e78f2d13744341d8"),
    ("000102030405060708090a0b0c0d0e0f", "5a5b6e278948d77f", "4141414141414141"),
    ("00000000000000000000000000000000", "4142434445464748", "a0390589f8b8efa5"),
    ("00000000000000000000000000000000", "4141414141414141", "ed23375a821a8c2d"),
    ("00000000000000000000000000000000", "70e1225d6e4e7655", "4141414141414141"),
)

# From Botan's src/tests/data/block/xtea.vec.
BOTAN = (
    ("00112233445566778899aabbccddeeff", "fefefefefefefefe", "36552e889d6a41cf"),
    ("00112233445566778899aabbccddeeff", "0123456789abcdef", "b8bf2821622b5b30"),
    ("d94576cd1a5f99e4155dc7bec5d33df2", "d51399607f7aa9d7", "782e4e131c5ba746"),
    ("07ef12bc9d06d7da20131116b665e335", "10b233473624ccd3", "57733a1deece283e"),
    ("a6bfb85fa91b8ca4197c8b502a62f972", "3daadd7a9633e19b", "4de5c07ea1564a64"),
)

# Multi-block ECB (Botan): the two blocks above, four times over.
ECB_KEY = "00112233445566778899aabbccddeeff"
ECB_PLAIN = "fefefefefefefefe0123456789abcdef" * 4
ECB_CIPHER = "36552e889d6a41cfb8bf2821622b5b30" * 4

# Bootstrap shape: the seed's example password, PKCS#7 padded, under a 16-letter temporary secret
# (computed with the PyPI package).
BOOT_KEY = "QWERTYUIOPASDFGH"
BOOT_PASSWORD = "3rasfst4swfa"
BOOT_CIPHER = "fc9bafed2c8416fcfb413121294a55a4"
