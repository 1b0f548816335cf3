"""The cryptography of sparkgd's wire, all of it from the ``cryptography`` package
(a maintained library, OpenSSL underneath: no cryptography of our own).

* :func:`derive` -- HKDF-SHA256: every key of a connection comes from the fit's key
  and both ends' fresh nonces, one key per purpose and direction;
* :class:`Sealer` -- AES-256-GCM for one direction of one connection; the nonce is
  the frame's sequence number in that direction, so a frame replayed, reordered,
  dropped or moved to another connection does not open (GCM's tag covers the frame's
  clear prefix too, as associated data);
* :class:`Share` -- X25519: every connection's keys also depend on a secret the two
  ends agree on over the wire, so a recording of a whole fit -- the closure that
  carried the fit's key included, where Spark does not encrypt it -- opens none of its
  frames.

Where a fit's own key comes from (what Spark protects) is :mod:`sparkgd.engine.keys`.
"""
from __future__ import annotations

import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Bytes of a key, of a GCM tag.
KEY, TAG = 32, 16
#: GCM nonces: 96 bits, the sequence number little-endian.
_NONCE = 12


class Unsealed(ValueError):
    """Bytes that do not open under this connection's key at this sequence number:
    forged, altered, replayed, reordered, or from another connection."""


def derive(key, salt, label, length=KEY):
    """HKDF-SHA256(``key``; ``salt``, ``b"sparkgd " + label``)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=bytes(salt),
                info=b"sparkgd " + label).derive(bytes(key))


def new_key():
    return os.urandom(KEY)


def same(a, b):
    """Constant-time equality of two byte strings."""
    return hmac.compare_digest(bytes(a), bytes(b))


class Sealer:
    """AES-256-GCM under one key, for one direction: :meth:`seal` and :meth:`open`
    each take the next sequence number (a sender and its receiver count alike)."""

    def __init__(self, key):
        self._aead = AESGCM(bytes(key))
        self.seq = 0

    def _nonce(self):
        nonce = self.seq.to_bytes(_NONCE, "little")
        self.seq += 1
        return nonce

    def seal(self, aad, data):
        """``data`` (a buffer) -> ciphertext + tag."""
        return self._aead.encrypt(self._nonce(), data, bytes(aad))

    def open(self, aad, data, into=None):
        """Ciphertext + tag -> the plaintext (into the writable buffer ``into`` when
        given: ``len(data) - TAG`` bytes). :class:`Unsealed` when it does not open."""
        nonce = self._nonce()
        try:
            if into is not None:
                self._aead.decrypt_into(nonce, data, bytes(aad), into)
                return into
            return self._aead.decrypt(nonce, data, bytes(aad))
        except InvalidTag:
            raise Unsealed("a frame that does not open under this connection's key "
                           f"as number {self.seq - 1} (forged, altered, replayed or "
                           "reordered)") from None


class Share:
    """An X25519 key pair for one fit's hub, or one task connection: its public half
    travels (:attr:`public`), :meth:`shared` with the other end's public half gives both
    ends the same secret, which a recording of the traffic does not."""

    PUBLIC = 32

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def shared(self, their_public):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(bytes(their_public)))
        except ValueError:   # an all-zero (low-order) point: no shared secret
            raise Unsealed("a key share that gives no shared secret") from None
