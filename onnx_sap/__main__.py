"""`python -m onnx_sap` runs the CLI."""

from .cli import main

main()
