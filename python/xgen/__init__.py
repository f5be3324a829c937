"""xgen: Salesforce XGen-7B models in Python.

``Tokenizer`` is the exact XGen tokenizer (embedded, no files); ``Model`` loads a model directory,
a GGUF file or a Hugging Face Hub id and generates with transformers' ``generate`` keywords.
Calls release the GIL while they run and stop on Ctrl-C.
"""

from ._xgen import Model, TextStream, Tokenizer, __version__

__all__ = ["Model", "TextStream", "Tokenizer", "__version__"]
