"""`python -m prism_lightning <command>`."""

from prism_lightning.cli import main

if __name__ == "__main__":
    main()
