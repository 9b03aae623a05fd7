"""RLlib integration for CVPO."""
