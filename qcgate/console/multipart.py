"""A streaming parser of ``multipart/related`` bodies (RFC 2387 over RFC 2046), for STOW-RS.

Bytes go in as they arrive (``feed``); events come out: a part's headers, its content in pieces, its
end. Nothing is held but the unscanned tail of the input (at most one chunk plus the delimiter's
length, or one part's header block), so a body of any size is parsed in bounded memory.

The delimiter is CRLF ``--boundary``; the first may open the body without the CRLF (the buffer starts
with a virtual CRLF). After a delimiter come either ``--`` (the close delimiter: the epilogue that
follows is ignored) or optional transport padding (spaces, tabs) and CRLF, then the part's header
lines up to an empty line. A delimiter-looking string followed by anything else is content.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEADER_BYTES = 16_384  # one part's header block
MAX_PADDING_BYTES = 1024  # transport padding after a delimiter
_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _DONE = range(5)


class MultipartError(Exception):
    """The body is not a well-formed multipart body (a 400)."""


@dataclass(frozen=True)
class PartHeaders:
    headers: dict[str, str]  # lower-case names


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartHeaders | PartData | PartEnd
PART_END = PartEnd()


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; name=value; name="quoted; value"`` -> (lower-case type, {lower-case name: value})."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(ch)
    pieces.append("".join(current))
    media_type = pieces[0].strip().lower()
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, sep, raw = piece.partition("=")
        if not sep:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        params[name.strip().lower()] = raw
    return media_type, params


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for raw in block.split(b"\r\n"):
        line = raw.decode("latin-1")
        if not line:
            continue
        if line[0] in " \t" and last is not None:  # an obsolete folded line continues the previous one
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or any(c in name for c in " \t"):
            raise MultipartError(f"malformed part header line {line[:80]!r}")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


class MultipartParser:
    """Push parser: ``feed(chunk)`` returns the events that chunk completes; ``finish()`` at the end."""

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 70:
            raise MultipartError("the boundary must have 1 to 70 characters (RFC 2046)")
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buffer = bytearray(b"\r\n")  # so that a body opening with --boundary matches the delimiter
        self._state = _PREAMBLE
        self.parts = 0

    @property
    def done(self) -> bool:
        """True once the close delimiter was read."""
        return self._state == _DONE

    @property
    def in_part(self) -> bool:
        """True while a part has begun (its headers or content) but not ended."""
        return self._state in (_HEADERS, _BODY)

    def feed(self, chunk: bytes) -> list[Event]:
        if self._state == _DONE:
            return []  # the epilogue
        self._buffer += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> None:
        """The body ended: raise MultipartError unless the close delimiter was read."""
        if self._state == _DONE:
            return
        if self._state == _PREAMBLE:
            raise MultipartError("no part: the body holds no delimiter of the boundary in its Content-Type")
        raise MultipartError("the body ended before the close delimiter: truncated")

    def _step(self, events: list[Event]) -> bool:
        """One transition; False when more input is needed."""
        buffer = self._buffer
        delimiter = self.delimiter
        if self._state == _BODY:
            index = buffer.find(delimiter)
            if index < 0:
                keep = len(delimiter) - 1
                if len(buffer) > keep:
                    events.append(PartData(bytes(buffer[:-keep])))
                    del buffer[:-keep]
                return False
            after = index + len(delimiter)
            if len(buffer) < after + 2:  # what follows decides whether this is a delimiter
                if index:
                    events.append(PartData(bytes(buffer[:index])))
                    del buffer[:index]
                return False
            if not self._delimiter_follows(buffer[after:after + 2]):
                events.append(PartData(bytes(buffer[:after])))  # content that merely looks like one
                del buffer[:after]
                return True
            if index:
                events.append(PartData(bytes(buffer[:index])))
            events.append(PART_END)
            del buffer[:after]
            self._state = _AFTER_DELIMITER
            return True
        if self._state == _PREAMBLE:
            index = buffer.find(delimiter)
            while index >= 0:
                after = index + len(delimiter)
                if len(buffer) < after + 2:
                    del buffer[:index]
                    return False
                if self._delimiter_follows(buffer[after:after + 2]):
                    del buffer[:after]
                    self._state = _AFTER_DELIMITER
                    return True
                index = buffer.find(delimiter, index + 1)
            keep = len(delimiter) + 1
            if len(buffer) > keep:
                del buffer[:-keep]
            return False
        if self._state == _AFTER_DELIMITER:
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = _DONE
                buffer.clear()
                return False
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_PADDING_BYTES:
                    raise MultipartError("a delimiter line is not followed by CRLF")
                return False
            if buffer[:end].strip(b" \t"):
                raise MultipartError("a delimiter line holds more than transport padding")
            del buffer[:end + 2]
            self._state = _HEADERS
            self.parts += 1
            return True
        if self._state == _HEADERS:
            if buffer[:2] == b"\r\n":  # no header lines at all
                del buffer[:2]
                events.append(PartHeaders({}))
                self._state = _BODY
                return True
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise MultipartError(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")
                return False
            if end > MAX_HEADER_BYTES:
                raise MultipartError(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")
            headers = _parse_headers(bytes(buffer[:end]))
            del buffer[:end + 4]
            events.append(PartHeaders(headers))
            self._state = _BODY
            return True
        return False  # _DONE

    @staticmethod
    def _delimiter_follows(two: bytes | bytearray) -> bool:
        return two == b"--" or two == b"\r\n" or two[:1] in (b" ", b"\t")
