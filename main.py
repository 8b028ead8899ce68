"""recon-attack's command line, as `python main.py ...` (the same as the `recon-attack` console script): the flags
are parsed, resolved against a checkpoint and dispatched by recon_attack.cli."""
from recon_attack.cli import main

if __name__ == '__main__':
    main()
