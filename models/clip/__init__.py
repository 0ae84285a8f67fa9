from models.clip.config import CLIPConfig, TextConfig, VisionConfig  # noqa: F401
