"""Thin wrappers over maintained primitives (no cryptography is implemented here).

- Key agreement: X25519 (`cryptography`), the shared secret through HKDF-SHA256 into a
  32-byte key.
- Authenticated encryption of the secret shares: Fernet (AES-128-CBC + HMAC-SHA256,
  `cryptography`), keyed with the agreed key.
- Masks: the ChaCha20 keystream (`cryptography`) of a 32-byte seed, read as uint64 words:
  a cryptographic PRG (Flower's `pseudo_rand_gen` folds its seed to 32 bits for NumPy's
  Mersenne Twister, which a server could search; it is not used).
- Shamir t-of-n sharing of 32-byte secrets: `pycryptodome`'s `Shamir` over GF(2^128),
  on each 16-byte half.
"""

from __future__ import annotations

import base64
import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

__all__ = ["KeyPair", "agree", "seal", "unseal", "prg_words", "share_secret",
           "combine_shares", "new_seed", "SecAggCryptoError"]


class SecAggCryptoError(ValueError):
    """A share or ciphertext does not decrypt or combine (tampered, or the wrong key)."""


class KeyPair:
    """An X25519 key pair; `public` is the 32 raw bytes a device advertises."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._sk = (X25519PrivateKey.from_private_bytes(secret) if secret is not None
                    else X25519PrivateKey.generate())
        self.public = self._sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def secret(self) -> bytes:
        """The 32 raw secret bytes (shared with neighbours in SecAgg, for dropouts)."""
        return self._sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def agree(self, peer_public: bytes, info: bytes) -> bytes:
        return agree(self, peer_public, info)


def agree(mine: KeyPair, peer_public: bytes, info: bytes) -> bytes:
    """32-byte key both ends derive: HKDF-SHA256(X25519(mine, peer), info)."""
    try:
        shared = mine._sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggCryptoError(f"bad public key ({e})") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes) -> bytes:
    return Fernet(base64.urlsafe_b64encode(key)).encrypt(plaintext)


def unseal(key: bytes, token: bytes) -> bytes:
    try:
        return Fernet(base64.urlsafe_b64encode(key)).decrypt(token)
    except InvalidToken:
        raise SecAggCryptoError("a sealed share does not open with the agreed key") from None


def new_seed() -> bytes:
    return os.urandom(32)


def prg_words(seed: bytes, n: int) -> np.ndarray:
    """n uint64 words of the ChaCha20 keystream of `seed` (32 bytes)."""
    if len(seed) != 32:
        raise SecAggCryptoError(f"a mask seed is 32 bytes, got {len(seed)}")
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype=np.uint64).copy()


def share_secret(secret: bytes, threshold: int, n: int) -> list[bytes]:
    """n shares of a 32-byte secret, any `threshold` of which rebuild it: each share is
    1 byte of index + 16 + 16 bytes (the two halves' Shamir shares at that index)."""
    if len(secret) != 32:
        raise SecAggCryptoError(f"a shared secret is 32 bytes, got {len(secret)}")
    lo = Shamir.split(threshold, n, secret[:16], ssss=False)
    hi = Shamir.split(threshold, n, secret[16:], ssss=False)
    return [bytes([i]) + a + b for (i, a), (_, b) in zip(lo, hi, strict=True)]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret from at least `threshold` shares (more are fine)."""
    if any(len(s) != 33 for s in shares):
        raise SecAggCryptoError("a share is 33 bytes (index + two 16-byte halves)")
    try:
        lo = Shamir.combine([(s[0], s[1:17]) for s in shares], ssss=False)
        hi = Shamir.combine([(s[0], s[17:]) for s in shares], ssss=False)
    except ValueError as e:
        raise SecAggCryptoError(f"shares do not combine ({e})") from None
    return lo + hi
