"""Which worker gets a new connection: a classic BPF program for one SO_REUSEPORT group.

The kernel runs the program on each SYN that reaches the group and takes its return value as
the index of the socket to use, in the order the sockets started listening (an index out of
range falls back to the kernel's hash). The program answers `source address mod N`, so every
connection of one instance reaches the same worker, and that worker's per-source connection
cap and rate limit see all of it — the same limits as one process. IPv6 uses the low 32 bits
of the source address (an instance's interface identifier).

Loopback clients (127.0.0.0/8, ::1) are never instances: health checks and load generators,
which often have a single address. They are spread by a hash of the source port, so each worker
counts them separately (their per-source limits apply per worker).

Where the data is: on a reuseport socket the packet seen by the program starts after the TCP
header (net/core/sock_reuseport.c `run_bpf_filter` pulls `hdr_len` first), so the IP header is
read through the SKF_NET_OFF negative offset, which the kernel resolves from the skb's network
header, and the TCP source port at the network header plus the IP header's length.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000

# linux/bpf_common.h and linux/filter.h encodings
_LD_W_ABS = 0x00 | 0x00 | 0x20
_LD_H_ABS = 0x00 | 0x08 | 0x20
_LD_H_IND = 0x00 | 0x08 | 0x40
_LDX_B_MSH = 0x01 | 0x10 | 0xA0
_ALU_RSH_K = 0x04 | 0x70
_ALU_MUL_K = 0x04 | 0x20
_ALU_MOD_K = 0x04 | 0x90
_JEQ_K = 0x05 | 0x10
_RET_A = 0x06 | 0x10
_TAX = 0x07 | 0x00
_TXA = 0x07 | 0x80

Instruction = tuple[int, int, int, int]  # code, jump-if-true, jump-if-false, k

MAX_WORKERS = 64
# Knuth's multiplicative hash for ports: connect(2) hands out ephemeral ports of one parity
# first (Linux 4.6+), so `port mod 2` would send every loopback connection to one worker.
_PORT_MIX = 2654435761


def _net(offset: int) -> int:
    """`k` for a load at `offset` bytes into the IP header."""
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def program(family: socket.AddressFamily, workers: int) -> list[Instruction]:
    """The steering program for a group of `workers` sockets of `family`."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_WORKERS}")
    if family == socket.AF_INET:
        return [
            (_LD_W_ABS, 0, 0, _net(12)),  # A = source address
            (_TAX, 0, 0, 0),
            (_ALU_RSH_K, 0, 0, 24),
            (_JEQ_K, 3, 0, 127),  # 127.0.0.0/8: by port
            (_TXA, 0, 0, 0),
            (_ALU_MOD_K, 0, 0, workers),
            (_RET_A, 0, 0, 0),
            (_LDX_B_MSH, 0, 0, _net(0)),  # X = IP header length
            (_LD_H_IND, 0, 0, _net(0)),  # A = TCP source port, at X bytes into the IP header
            *_port_hash(workers),
        ]
    if family == socket.AF_INET6:
        return [
            (_LD_W_ABS, 0, 0, _net(8)),  # the source address, 4 words from offset 8
            (_JEQ_K, 0, 6, 0),
            (_LD_W_ABS, 0, 0, _net(12)),
            (_JEQ_K, 0, 4, 0),
            (_LD_W_ABS, 0, 0, _net(16)),
            (_JEQ_K, 0, 2, 0),
            (_LD_W_ABS, 0, 0, _net(20)),
            (_JEQ_K, 3, 0, 1),  # ::1: by port
            (_LD_W_ABS, 0, 0, _net(20)),
            (_ALU_MOD_K, 0, 0, workers),
            (_RET_A, 0, 0, 0),
            # A SYN carries no extension header: TCP follows the fixed 40-byte header.
            (_LD_H_ABS, 0, 0, _net(40)),
            *_port_hash(workers),
        ]
    raise ValueError(f"no steering program for address family {family!r}")


def _port_hash(workers: int) -> list[Instruction]:
    """A = ((A * _PORT_MIX) mod 2**32 >> 16) mod workers; return A."""
    return [
        (_ALU_MUL_K, 0, 0, _PORT_MIX),
        (_ALU_RSH_K, 0, 0, 16),
        (_ALU_MOD_K, 0, 0, workers),
        (_RET_A, 0, 0, 0),
    ]


def pick(address: str, port: int, workers: int) -> int:
    """The worker `program` sends a connection from (address, port) to (tests, operators)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_loopback:
        return (((port * _PORT_MIX) & 0xFFFFFFFF) >> 16) % workers
    if ip.version == 6:
        return (int(ip) & 0xFFFFFFFF) % workers
    return int(ip) % workers


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


def attach(sock: socket.socket, instructions: list[Instruction]) -> None:
    """Attach `instructions` to the reuseport group of `sock` (bound, with SO_REUSEPORT)."""
    array = (_SockFilter * len(instructions))(*(_SockFilter(*i) for i in instructions))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HP", len(instructions), ctypes.addressof(array))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
