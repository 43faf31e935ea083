"""`deem chat`: a multi-turn conversation in the terminal, answers streamed token by token.

Commands: `/image PATH [PATH ...]` attaches images to the next message, `/reset` starts over, `/system TEXT` sets
the system prompt, `/set KEY VALUE` changes a generation setting (max_new_tokens, temperature, top_p, seed,
num_beams, repetition_penalty), `/help`, `/quit`.
"""

from __future__ import annotations

from collections.abc import Callable

from deem.infer.engine import InferenceEngine, TokenEvent
from deem.infer.inputs import Turn
from deem.infer.request import InferenceError, SamplingParams

HELP = """commands:
  /image PATH [PATH ...]   attach images to your next message
  /reset                   forget the conversation (and pending images)
  /system TEXT             set the system prompt (and start over)
  /set KEY VALUE           max_new_tokens, temperature, top_p, seed, num_beams, repetition_penalty
  /help                    this text
  /quit                    leave (also Ctrl-D)"""

SETTINGS = {"max_new_tokens": int, "temperature": float, "top_p": float, "seed": int, "num_beams": int,
            "repetition_penalty": float}


class ChatSession:
    """The state of one conversation (history, pending images, settings) and its commands."""

    def __init__(self, engine: InferenceEngine, params: SamplingParams, system: str | None = None) -> None:
        self.engine, self.params, self.system = engine, params, system
        self.history: list[Turn] = []
        self.pending: list = []

    def command(self, line: str, say: Callable[[str], None]) -> bool:
        """Run a /command; returns False for /quit."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            say(HELP)
        elif name == "reset":
            self.history, self.pending = [], []
            say("(conversation cleared)")
        elif name == "system":
            self.system, self.history, self.pending = rest or None, [], []
            say("(system prompt set; conversation cleared)")
        elif name == "image":
            for path in rest.split():
                try:
                    self.pending.append(self.engine.prepare_image(path, path))
                    say(f"(image {path} attached)")
                except InferenceError as exc:
                    say(f"error: {exc}")
        elif name == "set":
            key, _, value = rest.partition(" ")
            if key not in SETTINGS:
                say(f"error: unknown setting {key!r}; one of {', '.join(SETTINGS)}")
            else:
                try:
                    self.params = self.params.replace(**{key: SETTINGS[key](value)})
                    say(f"({key} = {value})")
                except (ValueError, InferenceError) as exc:
                    say(f"error: {exc}")
        else:
            say(f"error: unknown command /{name} (/help lists them)")
        return True

    def ask(self, text: str, write: Callable[[str], None]) -> str:
        """Send a user message with the pending images; `write` receives the answer as it is generated.
        On an error the message is not kept in the history."""
        turn = Turn("user", [*self.pending, text])
        request = self.engine.chat_request([*self.history, turn], self.params, self.system)

        def on_event(ev: TokenEvent) -> None:
            if ev.sequence == 0 and ev.text:
                write(ev.text)

        answer = self.engine.generate([request], on_event=on_event)[0].text
        self.history += [turn, Turn("assistant", [answer])]
        self.pending = []
        return answer


def run_chat(engine: InferenceEngine, params: SamplingParams, system: str | None = None,
             read: Callable[[str], str] | None = None, console=None) -> int:
    """The interactive loop (`read(prompt)` gives a line, EOFError ends)."""
    from rich.console import Console

    console = console or Console(highlight=False)
    read = read or (lambda prompt: console.input(prompt))
    session = ChatSession(engine, params, system)
    console.print("[bold]deem chat[/bold]: /image PATH attaches an image, /help lists the commands")

    def say(text: str) -> None:
        console.print(text, markup=False)

    while True:
        try:
            line = read("[bold green]you>[/bold green] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, say):
                return 0
            continue
        console.print("[bold blue]deem>[/bold blue] ", end="")
        try:
            session.ask(line, lambda t: console.print(t, end="", markup=False, soft_wrap=True))
            console.print()
        except InferenceError as exc:
            console.print()
            say(f"error: {exc}")
