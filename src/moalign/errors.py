"""The one exception type for bad user input: the message names the file and says how to fix it.

The rule, everywhere in the package:

- `MoalignError` is raised only where user input enters: files (videos, flow files, weights), manifests,
  run folders, caches, launch settings (command-line options such as ``--method`` or ``--dtype``) and
  checkpoints. The CLI prints it without a traceback and exits with status 2.
- Library code raises the built-in types: ValueError for a bad value (including the ``__post_init__``
  checks of the config dataclasses), TypeError for a bad type, KeyError for a missing key. The CLI turns a
  ValueError or TypeError from building a config or applying ``--set`` overrides into the same exit 2;
  anywhere else it is a bug in the calling code and keeps its traceback.
- An entry point that hands user input to library code (e.g. `VideoEncoder.from_pretrained`) converts the
  library's ValueError into a MoalignError with the same message.
"""


class MoalignError(Exception):
    """A user-facing error: bad input, a missing file, a wrong checkpoint. The CLI prints it without a traceback."""
