"""The stages, one per `rlhf` command, each a loop you can read top to bottom; a stage never imports another
(what two share lives in models/, engine/, data/, judges/ or train/). loop and demo run the others in turn."""
