"""Secure aggregation (SecAgg+): the server learns only the sum of the devices' vectors.

`primitives` wraps maintained cryptography (X25519, HKDF, Fernet and ChaCha20 from
`cryptography`; Shamir sharing from `pycryptodome`): nothing here implements a cipher.
`fixed_point` maps float64 onto the ring Z_2^64, `layout` turns one device's strategy
partial sum into a fixed-length vector and back, and `protocol` is the four-stage
exchange (docs/PRIVACY.md).
"""
