"""encrypt: authenticated encryption of every payload, in the spirit of age's STREAM.

Each stream gets a fresh random file key, wrapped (AEAD-encrypted) by a key derived from the
user's secret and a random salt, and carried in the header; the payload key is derived from the
file key and a hash of the whole header, so any change to the header (filter chain, page size,
wrapped key) makes every payload fail. Each payload is sealed with a nonce made of its position
(11-byte big-endian index, 1-byte last flag): reordered, repeated, dropped and foreign payloads
fail authentication, and a stream cut short lacks the payload flagged last. The construction
is specified in migpipe-wire(5).
"""

import base64
import hashlib
import hmac
from secrets import token_bytes  # the CSPRNG (`secrets` names the user's Secrets here)
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from migpipe.chain import ByteFilter, Position
from migpipe.errors import (
    CorruptError,
    IncompatibleError,
    SecretError,
    UsageError,
    quoted,
)
from migpipe.keys import KEY_SIZE, Secrets, UserKey

CIPHERS = {"aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}
CIPHER_NAMES = {"aes": "aes-256-gcm", "chacha20": "chacha20-poly1305"} | {c: c for c in CIPHERS}
TAG_SIZE = 16
SALT_SIZE = 16
SCRYPT_LOG_N = 17  # 128 MiB and about 0.4 s here: each guess costs an attacker as much
SCRYPT_LOG_N_MAX = 20  # refused above this on decode: a forged header must not cost 1 GiB+
WRAP_INFO = b"migpipe encrypt v1 key wrap "
PAYLOAD_INFO = b"migpipe encrypt v1 payload key "
HEADER_INFO = b"migpipe encrypt v1 header key"
REPLY_INFO = b"migpipe encrypt v1 reply key "
WRAP_NONCE = bytes(12)  # each wrapping key (fresh salt) seals exactly one message


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, size: int, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        data = b""
    if len(data) != size:
        raise CorruptError(f"encrypt: malformed {what} in the header")
    return data


def _wrapping_key(user: UserKey, salt: bytes, log_n: int | None) -> bytes:
    if user.kind == "passphrase":
        return Scrypt(salt=salt, length=KEY_SIZE, n=1 << log_n, r=8, p=1).derive(user.secret)
    return HKDF(hashes.SHA256(), KEY_SIZE, salt, WRAP_INFO).derive(user.secret)


class Encrypt(ByteFilter):
    name = "encrypt"
    stage = 2  # after compression: ciphertext does not compress
    seals = True

    def __init__(self, cipher: str, file_key: bytes, wrapping: dict[str, Any]) -> None:
        self.cipher = cipher
        self._file_key = file_key
        self._wrapping = wrapping  # kdf, salt, wrapped key (and scrypt's log_n) for the header
        self._aead: AESGCM | ChaCha20Poly1305 | None = None  # both made by bind()
        self._reply: AESGCM | ChaCha20Poly1305 | None = None

    @classmethod
    def from_argument(cls, argument: str | None, secrets: Secrets) -> "Encrypt":
        cipher = CIPHER_NAMES.get(argument or "aes")
        if cipher is None:
            raise UsageError(
                f"encrypt: unknown cipher {quoted(argument)} (aes-256-gcm or chacha20-poly1305)",
            )
        user = secrets.user_key("encrypt")
        file_key, salt = token_bytes(KEY_SIZE), token_bytes(SALT_SIZE)
        log_n = SCRYPT_LOG_N if user.kind == "passphrase" else None
        wrapped = AESGCM(_wrapping_key(user, salt, log_n)).encrypt(
            WRAP_NONCE, file_key, WRAP_INFO + cipher.encode()
        )
        wrapping = {
            "kdf": "scrypt" if log_n else "key",
            "salt": _b64(salt),
            "wrapped": _b64(wrapped),
        }
        if log_n:
            wrapping["log_n"] = log_n
        return cls(cipher, file_key, wrapping)

    @classmethod
    def from_params(cls, params: dict[str, Any], secrets: Secrets) -> "Encrypt":
        """Unwraps the file key with the user's secret: a wrong secret fails here, clearly."""
        cipher, kdf = params.get("cipher"), params.get("kdf")
        log_n = params.get("log_n")
        expected = {"cipher", "kdf", "salt", "wrapped", *(["log_n"] if kdf == "scrypt" else [])}
        if cipher not in CIPHERS or kdf not in ("key", "scrypt") or set(params) != expected:
            fields = ", ".join(sorted(params))
            message = (
                f"encrypt: unknown cipher {quoted(cipher)}, kdf {quoted(kdf)} or fields {fields}"
            )
            raise IncompatibleError(message)
        ceiling = min(SCRYPT_LOG_N_MAX, secrets.max_scrypt_log_n or SCRYPT_LOG_N_MAX)
        if kdf == "scrypt" and not (type(log_n) is int and 10 <= log_n <= ceiling):
            raise CorruptError(f"encrypt: scrypt cost 2^{log_n} is outside 2^10..2^{ceiling}")
        salt = _unb64(params["salt"], SALT_SIZE, "salt")
        wrapped = _unb64(params["wrapped"], KEY_SIZE + TAG_SIZE, "wrapped key")
        user = secrets.user_key("this stream is encrypted and")
        if (user.kind == "passphrase") != (kdf == "scrypt"):
            needed = "a passphrase" if kdf == "scrypt" else "a key file (--key-file/--key-fd)"
            raise SecretError(f"this stream was encrypted with {needed}")
        try:
            file_key = AESGCM(_wrapping_key(user, salt, log_n)).decrypt(
                WRAP_NONCE, wrapped, WRAP_INFO + cipher.encode()
            )
        except InvalidTag:
            raise SecretError(
                "encrypt: the key does not open this stream (wrong key or passphrase, "
                "or an altered header)",
            ) from None
        return cls(cipher, file_key, {k: v for k, v in params.items() if k != "cipher"})

    def params(self) -> dict[str, Any]:
        return {"cipher": self.cipher, **self._wrapping}

    def header_tag(self, signed: bytes) -> bytes:
        """HMAC-SHA-256 of the header's bytes before the tag, keyed from the file key: only a
        holder of the user's secret can make it, and it is checked before the header is used."""
        return hmac.digest(self._derive(HEADER_INFO), signed, "sha256")

    def check_header_tag(self, signed: bytes, tag: bytes) -> None:
        if not hmac.compare_digest(self.header_tag(signed), tag):
            raise CorruptError(
                "encrypt: the header failed authentication (altered after it was sealed)",
            )

    def bind(self, header: bytes) -> None:
        digest = hashlib.sha256(header).digest()
        self._aead = CIPHERS[self.cipher](self._derive(PAYLOAD_INFO + digest))
        self._reply = CIPHERS[self.cipher](self._derive(REPLY_INFO + digest))

    def _derive(self, info: bytes) -> bytes:
        return HKDF(hashes.SHA256(), KEY_SIZE, None, info).derive(self._file_key)

    def seal_reply(self, plain: bytes, index: int) -> bytes:
        """Under a key of this stream's own, so the nonce need only number the lines."""
        return self._reply.encrypt(index.to_bytes(12, "big"), plain, None)

    def open_reply(self, sealed: bytes, index: int) -> bytes:
        try:
            return self._reply.decrypt(index.to_bytes(12, "big"), sealed, None)
        except InvalidTag:
            raise CorruptError(
                "encrypt: the answer failed authentication (not sealed for this stream)",
            ) from None

    @staticmethod
    def _nonce(position: Position) -> bytes:
        return position.index.to_bytes(11, "big") + (b"\x01" if position.final else b"\x00")

    def encode(self, payload: bytes, position: Position) -> bytes:
        return self._aead.encrypt(self._nonce(position), payload, None)

    def decode(self, data: bytes, limit: int, position: Position) -> bytes:
        if not TAG_SIZE <= len(data) <= limit + TAG_SIZE:
            raise CorruptError(
                f"encrypt: payload {position.index} of {len(data)} bytes cannot be a sealed payload"
            )
        try:
            return self._aead.decrypt(self._nonce(position), data, None)
        except InvalidTag:
            what = "last payload" if position.final else f"payload {position.index}"
            raise CorruptError(
                f"encrypt: {what} failed authentication (altered, reordered, repeated, "
                "or from another stream)",
            ) from None
