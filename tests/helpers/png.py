"""Reading a PNG's size from its header: proof that a plot was written as a real image."""
import struct


def png_size(path):
    """(width, height) of a PNG file, from its header; fails on anything else."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])
