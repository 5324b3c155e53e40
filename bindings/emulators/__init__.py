"""Emulators that run compiled libraries built for other machines (parity
without the device): one module per emulator."""
