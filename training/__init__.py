"""Training and evaluation of emotion and engagement models (FER2013, image folders, DAiSEE)."""
