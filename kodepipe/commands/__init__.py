"""One module per kp-* command; each exposes ``cli`` (click) and ``main``.

``COMMANDS`` maps program names to modules, for the docs generator and bin/.
"""

COMMANDS = {
    "kp-image": "kodepipe.commands.image",
    "kp-clone": "kodepipe.commands.clone",
    "kp-ls": "kodepipe.commands.ls",
    "kp-rm": "kodepipe.commands.rm",
}
