"""The TDM algorithm: torch only, backbone-agnostic. Nothing here imports another part of tdm."""
