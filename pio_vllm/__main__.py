import sys

from pio_vllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
