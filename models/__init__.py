"""Model families (clip/, later dit/ and vlm/) and the blocks they share (common/)."""
