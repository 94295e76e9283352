#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/): a few small valid and invalid inputs per
target, so each campaign starts from the shapes the parsers expect instead of from nothing.
Rerun after changing it; the files it writes are committed. libFuzzer's own finds go to
fuzz/grown/ (ignored), never here."""
import hashlib
import hmac
import json
import os
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
MASK = bytes([0x37, 0xFA, 0x21, 0x3D])


def ws_client_frame(opcode, payload, fin=True, rsv=0, form=None):
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    if form is None:
        form = 0 if n <= 125 else 126 if n <= 0xFFFF else 127
    head = bytes([b0])
    if form == 0:
        head += bytes([0x80 | n])
    elif form == 126:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, value):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(value)
    return key + varint(len(value)) + value


def aws_message(mtype, stream_id=1, payload=b"", service=b"", services=(), connection_id=1):
    """[u16 length][protobuf Message] (PROTOCOLS.md: type=1, streamId=2, ignorable=3,
    payload=4, serviceId=5, availableServiceIds=6, connectionId=7)."""
    body = field(1, 0, mtype) + field(2, 0, stream_id)
    if payload:
        body += field(4, 2, payload)
    if service:
        body += field(5, 2, service)
    for s in services:
        body += field(6, 2, s)
    body += field(7, 0, connection_id)
    return struct.pack(">H", len(body)) + body


def aliyun_frame(header, payload=b""):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">H", len(h)) + h + payload


def upgrade(target, headers, method="GET"):
    lines = [f"{method} {target} HTTP/1.1", "Host: relay.example:8443"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


WS_HEADERS = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
]


def seeds():
    data_stream = aws_message(2, service=b"SSH") + aws_message(1, payload=b"hello")
    yield "ws_frame", {
        "binary": b"\x80" + ws_client_frame(2, data_stream),
        "fragments_and_ping": b"\x10"
        + ws_client_frame(2, b"abc", fin=False)
        + ws_client_frame(9, b"ping")
        + ws_client_frame(0, b"def"),
        "len16_nonminimal": b"\x90" + ws_client_frame(2, b"short", form=126),
        "len64": b"\x80" + ws_client_frame(2, bytes(300), form=127),
        "close_1000": b"\x80" + ws_client_frame(8, struct.pack(">H", 1000) + b"bye"),
        "close_bad_utf8": b"\x80" + ws_client_frame(8, struct.pack(">H", 1000) + b"\xff\xfe"),
        "text": b"\x80" + ws_client_frame(1, b"{}"),
        "rsv_bits": b"\x80" + ws_client_frame(2, b"x", rsv=4),
        "unmasked": b"\x80\x82\x02hi",
    }
    yield "aws_stream", {
        "start_data": b"\x00" + data_stream,
        "service_ids": b"\x03" + aws_message(5, stream_id=0, services=[b"SSH", b"RDP"]),
        "reset": b"\x01" + aws_message(3, service=b"SSH") + aws_message(7),
        "truncated": b"\x05" + aws_message(1, payload=b"x" * 40)[:20],
        "zero_length": b"\x00\x00\x00",
    }
    yield "aliyun_frame", {
        "session_create": aliyun_frame(
            {"frame_type": 2, "session_id": None, "frame_id": 1, "service_type": "_SSH"}
        ),
        "data": aliyun_frame({"frame_type": 4, "session_id": "s-1", "frame_id": 2}, b"payload"),
        "response": aliyun_frame(
            {"frame_type": 1, "session_id": "s-1", "frame_id": 1},
            b'{"code":0,"msg":"ok"}',
        ),
        "bad_json": b"\x00\x05{nope",
        "empty_header": b"\x00\x00",
    }
    key = bytes([7] * 32)
    signed = "\n".join(["IOTUNNEL-MESH/1", "a", "b", "1800000000000", "0011223344556677", "127.0.0.1:4000"])
    mac = hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()
    yield "mesh_preamble", {
        "valid": f"IOTUNNEL-MESH/1 a b 1800000000000 0011223344556677 127.0.0.1:4000 {mac}".encode(),
        "bad_mac": b"IOTUNNEL-MESH/1 a b 1800000000000 0011223344556677 127.0.0.1:4000 " + b"00" * 32,
        "short": b"IOTUNNEL-MESH/1 a b",
    }
    yield "upgrade_request", {
        "aws_v3": upgrade(
            "/tunnel?local-proxy-mode=source",
            WS_HEADERS + [("access-token", "tok"), ("Sec-WebSocket-Protocol", "aws.iot.securetunneling-3.0")],
        ),
        "aws_cookie": upgrade(
            "/tunnel?local-proxy-mode=destination",
            WS_HEADERS + [("Cookie", "a=b; awsiot-tunnel-token=tok"),
                          ("Sec-WebSocket-Protocol", "aws.iot.securetunneling-2.0")],
        ),
        "aliyun": upgrade(
            "/tunnel/t-1/device",
            WS_HEADERS + [("tunnel-access-token", "tok"), ("subprotocol", "aliyun.iot.securetunnel-v1.1")],
        ),
        "absolute_form": upgrade("wss://relay.example/tunnel/t-1/source", WS_HEADERS),
        "post": upgrade("/tunnel?local-proxy-mode=source", WS_HEADERS, method="POST"),
        "no_end": b"GET /tunnel HTTP/1.1\r\nUpgrade: websocket\r\n",
    }
    connect = {"operation": "connect", "tunnel_id": "t-1", "token": "tok",
               "url": "wss://relay.example:8443/tunnel", "endpoint": "relay.example:8443",
               "services": ["SSH"]}
    now = 1_800_000_000
    sig = hmac.new(b"device-secret", f"pk\ndev\n{now}".encode(), hashlib.sha256).hexdigest()
    yield "device_channel", {
        "connect": b"\x00" + json.dumps(connect).encode(),
        "connect_plain_v6": b"\x00" + json.dumps(dict(connect, url="ws://[::1]:80/", endpoint="[::1]:80")).encode(),
        "close": b"\x00" + json.dumps({"operation": "close", "tunnel_id": "t-1", "reason": "closed"}).encode(),
        "no_endpoint": b"\x00" + json.dumps({"operation": "connect", "tunnel_id": "t"}).encode(),
        "auth_good": f"\x01{now}\npk\ndev\n{now}\n{sig}".encode(),
        "auth_stale": f"\x01{now}\npk\ndev\n{now - 301}\n{sig}".encode(),
        "auth_extreme": f"\x01{now}\npk\ndev\n-9223372036854775808\n{sig}".encode(),
    }
    yield "api_json", {
        "account": b"\x00" + b'{"name":"Acme"}',
        "account_control_char": b"\x00" + b'{"name":"a\\u0007b"}',
        "device": b"\x01" + b'{"name":"dev-1:a@b"}',
        "tunnel": b"\x02" + json.dumps({"product_key": "pk", "device_name": "d", "custom_info": "x",
                                        "description": "y", "services": ["SSH", "HTTP"],
                                        "lifetime_seconds": 3600}).encode(),
        "tunnel_dup_services": b"\x02" + b'{"product_key":"p","device_name":"d","services":["A","A"]}',
        "batch": b"\x03" + b'{"tunnel_ids":["a","b"]}',
        "batch_empty": b"\x03" + b'{"tunnel_ids":[]}',
        "rotate": b"\x04" + b'{"side":"all"}',
        "search": b"\x05" + b"product_key=pk&state=OPEN&page_size=5&page_token=djE6NDI",
        "page_token": b"\x06" + struct.pack(">q", -(2**63)),
        "unknown_field": b"\x00" + b'{"name":"x","extra":1}',
    }


def main():
    for target, files in seeds():
        d = os.path.join(ROOT, target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
