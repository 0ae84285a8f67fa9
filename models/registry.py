"""Every model family the engine can run: name -> "module:attribute" of its `engine.family.ModelFamily`.

One line per family; modules are imported only when their family is used.
"""
FAMILIES = {
    "clip": "models.clip.family:CLIP",
    "llm": "models.llm.family:LLM",
    "dit": "models.dit.family:DIT",
    "vlm": "models.vlm.family:VLM",
}
