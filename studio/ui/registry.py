"""Every component of the UI under a name, "tab.name", and events wired by those names.

Each tab's build function registers its components (`ui.add("train", learning_rate=...)`);
handlers take a mapping of the values they asked for, by name, and return a mapping of updates,
by name, for any of the outputs they declared (the rest stay as they are). Nothing depends on
the order of widgets, so adding one shifts nothing, and handlers are plain functions a test
calls with a dict.

As LLaMA-Factory's webui manager does it, with one difference: gradio's own by-name form (a set
of components as inputs) orders the API's parameters by component creation, so adding a widget
would reorder them for every gradio_client caller; here the inputs of an event are a list of
names, which keeps the API's parameter order the declared one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gradio as gr


class Values(dict):
    """The values a handler was given, by name; asking for one it was not given says so."""

    def __missing__(self, name: str):
        raise KeyError(f"{name!r} is not among this handler's inputs ({', '.join(self) or 'none'})")


class Registry:
    def __init__(self) -> None:
        self._by_name: dict[str, gr.components.Component] = {}

    def add(self, tab: str, /, **components) -> None:
        """Register components under "tab.name"; a name is registered once."""
        for name, comp in components.items():
            key = f"{tab}.{name}"
            if key in self._by_name:
                raise ValueError(f"component {key} is registered twice")
            self._by_name[key] = comp

    def __getitem__(self, name: str):
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no component {name!r}; registered: {', '.join(self._by_name)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self, tab: str | None = None) -> list[str]:
        return [n for n in self._by_name if tab is None or n.startswith(tab + ".")]

    def bind(self, fn: Callable, inputs: Iterable[str] = (), outputs: Iterable[str] = ()) -> Callable:
        """`fn(values) -> {name: update}` as a gradio function over the components of those names.

        A generator is bound as a generator (each yield updates the outputs); `fn` with a
        `progress` parameter gets gradio's progress tracker under that name, and one with an
        `event` parameter the event's gr.SelectData (which row of a table was clicked, ...).
        """
        in_names, out_names = list(inputs), list(outputs)
        for n in in_names + out_names:
            self[n]  # an unknown name fails here, when the app is built, not at the first click
        wanted = inspect.signature(fn).parameters
        wants_event, wants_progress = "event" in wanted, "progress" in wanted

        def values_of(args: tuple) -> tuple[Values, dict]:
            extra = {}
            if wants_progress:
                args, extra["progress"] = args[:-1], args[-1]
            if wants_event:
                args, extra["event"] = args[:-1], args[-1]
            return Values(zip(in_names, args, strict=True)), extra

        def updates(out: Mapping[str, Any] | None) -> dict:
            out = {} if out is None else out
            if not isinstance(out, Mapping):
                raise TypeError(f"{fn.__name__} must return a mapping of names to updates, got {type(out).__name__}")
            unknown = [n for n in out if n not in out_names]
            if unknown:
                raise KeyError(f"{fn.__name__} returned {', '.join(unknown)}, not among its outputs "
                               f"({', '.join(out_names) or 'none'})")
            return {self[n]: v for n, v in out.items()}

        if inspect.isgeneratorfunction(fn):
            def call(*args):
                values, extra = values_of(args)
                for out in fn(values, **extra):
                    yield updates(out)
        else:
            def call(*args):
                values, extra = values_of(args)
                return updates(fn(values, **extra))

        # gradio reads the signature for its arity check and to find where the tracker goes, and
        # the annotations to find where the event data goes.
        params = [inspect.Parameter(f"in{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(len(in_names))]
        if wants_event:
            params.append(inspect.Parameter("event", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.SelectData))
            call.__annotations__ = {"event": gr.SelectData}
        if wants_progress:
            params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=gr.Progress()))
        call.__signature__ = inspect.Signature(params)
        call.__name__ = getattr(fn, "__name__", "handler")
        return call

    def on(self, event: Callable, fn: Callable, inputs: Iterable[str] = (), outputs: Iterable[str] = (), **kwargs):
        """Wire `fn` to `event` (`component.click`, `dependency.then`, ...) by names."""
        inputs, outputs = list(inputs), list(outputs)
        return event(self.bind(fn, inputs, outputs), [self[n] for n in inputs], [self[n] for n in outputs], **kwargs)
