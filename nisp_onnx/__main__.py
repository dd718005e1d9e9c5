"""`python -m nisp_onnx`."""

from .cli import main

main()
