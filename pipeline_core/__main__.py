"""`python -m pipeline_core` is the `batchrun` command (torchrun and accelerate launch modules, not scripts)."""

from pipeline_core.entry import main

if __name__ == "__main__":
    main()
