"""The command-line tools (`haplo-export`, `haplo-train`): a leaf package nothing imports."""
