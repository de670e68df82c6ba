"""The page's language, and the studio's English texts in that language.

The UI is built once, in English, and the services speak English (errors, job progress, status). A
page then speaks the language picked, in this order, from: `?lang=zh|en` in its address, `--lang`,
the in-page switch (kept in the `studio_lang` cookie), the browser's Accept-Language (zh-* ->
Chinese), else English.

`translate(text, lang)` turns any English text of the tables in `strings.py` into the same text of
another table, placeholders included: a template such as "Loaded {name} ({quant}) on {device}."
matches the English message and fills the Chinese one with the same values, which are translated in
turn (an activity inside a busy message, a reason inside a refusal). Unknown text is returned as it
is, so a new service message shows in English until the tables learn it.

`LabelRegistry` remembers every component whose label, info, placeholder, text or choice labels
came from the tables, and gives the updates that show them in another language.
"""

from __future__ import annotations

import functools
import re

from studio.ui.strings import EN, LANGUAGES

SUPPORTED = tuple(LANGUAGES)
DEFAULT = "en"
COOKIE = "studio_lang"
# Sections whose texts are only ever part of another message (activities, actions, statuses, field names).
NESTED_ONLY = ("terms", "fields")
# Sections read only by key (table headers, model card rows, plot series): short words such as "base" or
# "status" that must never be translated when they are a whole message or part of one.
KEYED_ONLY = ("tables",)
LONGEST_TRANSLATED = 6000  # a chat reply or a prompt preview is never a message of the tables
MOST_LINES_TRANSLATED = 60  # a text of more lines is no message of the studio's: each line costs a pass
PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Runs in the page before the language switch's handler: remembers the choice, marks the page with it (the
# stylesheet names Gradio's message boxes in that language: Gradio titles them "Error" or "Warning" whatever
# the page's language), and passes the inputs on.
SET_COOKIE_JS = ("(lang, ...rest) => { if (lang) { document.cookie = '" + COOKIE + "=' + lang + "
                 "'; path=/; max-age=31536000; SameSite=Lax'; document.documentElement.dataset.studioLang = lang; } "
                 "return [lang, ...rest]; }")


# ----- which language -----------------------------------------------------------------------------
def normalize(code: str | None) -> str | None:
    """'zh', 'zh-CN', 'zh_TW', 'ZH-hans' -> 'zh'; 'en-US' -> 'en'; anything else -> None."""
    if not code:
        return None
    primary = re.split(r"[-_]", code.strip().lower(), maxsplit=1)[0]
    return primary if primary in SUPPORTED else None


def from_accept_language(header: str | None) -> str | None:
    """The first supported language of an Accept-Language header, by its q-weights."""
    ranked = []
    for position, part in enumerate((header or "").split(",")):
        code, _, params = part.strip().partition(";")
        weight = 1.0
        match = re.search(r"q=([0-9.]+)", params)
        if match:
            try:
                weight = float(match.group(1))
            except ValueError:
                weight = 0.0
        ranked.append((-weight, position, code))
    for _, _, code in sorted(ranked):
        if normalize(code):
            return normalize(code)
    return None


def pick_language(query: str | None = None, forced: str | None = None, cookie: str | None = None,
                  accept_language: str | None = None) -> str:
    """The page's language: the address's ?lang=, then --lang, the switch's cookie, the browser."""
    for choice in (normalize(query), normalize(forced), normalize(cookie), from_accept_language(accept_language)):
        if choice:
            return choice
    return DEFAULT


def request_language(request, forced: str | None = None, use_query: bool = True) -> str:
    """The language of the page that sent `request` (a gr.Request, or None for English)."""
    if request is None:
        return normalize(forced) or DEFAULT
    headers = getattr(request, "headers", None) or {}
    try:
        cookies = request.cookies or {}
    except Exception:  # a request object without cookies (e.g. built by a test)
        cookies = {}
    try:
        query = (request.query_params or {}).get("lang") if use_query else None
    except Exception:
        query = None
    return pick_language(query, forced, cookies.get(COOKIE), headers.get("accept-language"))


def handler_language(request) -> str:
    """The language a handler answers in: the switch's cookie (the page sets it on load), the browser."""
    return request_language(request, use_query=False)


# ----- translating text -------------------------------------------------------------------------
MATCH_STEPS = 200  # a template's searches of one message: each is linear, so the whole match is too


class Template:
    """One template of the tables, matched against a message by finding its literal parts in order.

    The message must start and end with the template's first and last literal parts; each value takes
    the shortest text that lets the rest match (as a lazy regex would), and a placeholder used twice must
    take the same value both times. The search for that split gives up after MATCH_STEPS searches, so a
    message built to make it backtrack costs linear time, not exponential: the page sends its shown
    texts back when its language changes, and a backtracking regex once held the server for minutes."""

    def __init__(self, template: str):
        parts = PLACEHOLDER.split(template)
        self.literals: list[str] = parts[::2]   # n + 1 literal parts around n placeholders
        self.names: list[str] = parts[1::2]

    def match(self, message: str) -> dict[str, str] | None:
        first, last = self.literals[0], self.literals[-1]
        if not message.startswith(first) or not message.endswith(last) or len(message) < len(first) + len(last):
            return None
        if not self.names:
            return {} if message == first else None
        values = self._split(message, len(first), len(message) - len(last), 0, [], [0])
        return None if values is None else dict(zip(self.names, values))

    def _consistent(self, values: list) -> bool:
        found: dict[str, str] = {}
        return all(found.setdefault(name, value) == value for name, value in zip(self.names, values))

    def _split(self, message: str, start: int, end: int, index: int, values: list, steps: list):
        """Values for placeholders index.. in message[start:end], each ended by the literal after it."""
        if index == len(self.names) - 1:
            values = values + [message[start:end]]
            return values if self._consistent(values) else None
        literal, at = self.literals[index + 1], start - 1
        while steps[0] < MATCH_STEPS:
            steps[0] += 1
            at = message.find(literal, at + 1, end)
            if at < 0:
                return None
            found = self._split(message, at + len(literal), end, index + 1, values + [message[start:at]], steps)
            if found is not None:
                return found
        return None


class Translator:
    """Text of one table -> the same text in another, for exact texts and templates with placeholders."""

    def __init__(self, tables: dict[str, dict], source: str = DEFAULT):
        self.tables, self.source = tables, source
        self.exact: dict[str, tuple[str, str]] = {}
        self.nested_exact: dict[str, tuple[str, str]] = {}
        templates = []
        for section, entries in tables[source].items():
            if section in KEYED_ONLY:
                continue
            for key, text in entries.items():
                target = self.nested_exact if section in NESTED_ONLY else self.exact
                if PLACEHOLDER.search(text):
                    literals = [part for part in PLACEHOLDER.split(text)[::2] if part]
                    templates.append((sum(map(len, literals)), section, key, Template(text), literals))
                target.setdefault(text, (section, key))
        # the most specific template first, so "... steps, resumed at step {step}." wins over "... {steps}."
        self.templates = [entry[1:] for entry in sorted(templates, key=lambda entry: -entry[0])]

    def text(self, section: str, key: str, lang: str) -> str:
        return self.tables.get(lang, EN).get(section, {}).get(key) or EN[section][key]

    def translate(self, message: str, lang: str, nested: bool = False, depth: int = 0) -> str:
        if lang == self.source or lang not in self.tables or not isinstance(message, str) or not message.strip():
            return message
        if len(message) > LONGEST_TRANSLATED or depth > 3:
            return message
        found = self.exact.get(message) or (self.nested_exact.get(message) if nested else None)
        if found:
            return self.text(*found, lang)
        for section, key, template, literals in self.templates:
            if section in NESTED_ONLY and not nested:
                continue
            if not all(literal in message for literal in literals):
                continue
            match = template.match(message)
            if match is not None:
                values = {name: self.translate(value, lang, True, depth + 1) for name, value in match.items()}
                return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), self.text(section, key, lang))
        if "\n" in message and not nested and message.count("\n") < MOST_LINES_TRANSLATED:
            return "\n".join(self.translate(line, lang) for line in message.split("\n"))
        return message


@functools.lru_cache(maxsize=len(SUPPORTED))
def translator(source: str = DEFAULT) -> Translator:
    return Translator(LANGUAGES, source)


def translate(message, lang: str):
    """`message` (English) in `lang` when the tables know it (exactly or as a template); otherwise unchanged."""
    return translator().translate(message, lang)


def retranslate(message, lang: str):
    """`message` in any of the tables' languages, shown in `lang` (for texts already on a page)."""
    for source in SUPPORTED:
        if source != lang:
            translated = translator(source).translate(message, lang)
            if translated != message:
                return translated
    return message


def text(section: str, key: str, lang: str) -> str:
    """One entry of the tables in `lang` (English where the table lacks it)."""
    return translator().text(section, key, lang)


def term(word: str, lang: str) -> str:
    """A word of the tables' terms (a run's status such as "completed" or "stopped at step 5", an activity) in
    `lang`: terms are translated only as parts of messages, so a table cell that is one asks for it here."""
    return translator().translate(word, lang, nested=True)


def translate_outputs(value, lang: str):
    """A handler's return value with every plain string translated (tuples and lists walked, one level)."""
    if lang == DEFAULT:
        return value
    if isinstance(value, str):
        return translate(value, lang)
    if isinstance(value, tuple):
        return tuple(translate(item, lang) if isinstance(item, str) else item for item in value)
    return value


def column(name: str, lang: str) -> str:
    """A table's column header, or a report column's name, in `lang`; a name the tables lack stays as it is."""
    for key in (f"col_{name}", f"col_{name.replace(' ', '_')}"):  # "train loss" is the key col_train_loss
        if key in EN["tables"]:
            return text("tables", key, lang)
    return name


# ----- the page's components --------------------------------------------------------------------
TEXT_PROPS = ("label", "info", "placeholder", "x_title")  # x_title: the training plots' axis
CHOICE_TYPES = ("Radio", "CheckboxGroup")  # components whose choice labels are static


FIXED_CHOICES = "fixed-choices"  # the elem_classes mark of a dropdown whose choices never change


def _static_choices(block, known) -> bool:
    """Whether `block` shows fixed choices whose labels come from the tables: a radio or check group with
    one such label, or a dropdown marked FIXED_CHOICES (other dropdowns list the user's files, adapters
    and runs, which change: their choices are never reset from a snapshot)."""
    choices = getattr(block, "choices", None) or []
    labels = [c[0] for c in choices if isinstance(c, (tuple, list))]
    if type(block).__name__ in CHOICE_TYPES:
        return any(label in known for label in labels)
    return FIXED_CHOICES in (getattr(block, "elem_classes", None) or []) and any(label in known for label in labels)


class LabelRegistry:
    """The page's components whose visible texts come from the tables.

    Labels, hints, placeholders, button texts, radio choices and fixed dropdown choices are static: their English text is
    kept here. Markdown texts change (status lines, results): the switch reads what each shows now
    and translates that, from whichever language it is in.
    """

    def __init__(self):
        self.static: list[tuple[object, dict[str, str], list | None]] = []
        self.markdown: list = []

    @classmethod
    def collect(cls, blocks) -> "LabelRegistry":
        import gradio as gr

        registry = cls()
        known = translator().exact
        for block in blocks.blocks.values():
            if isinstance(block, gr.Markdown):
                registry.markdown.append(block)
                continue
            texts = {prop: getattr(block, prop) for prop in TEXT_PROPS
                     if isinstance(getattr(block, prop, None), str) and getattr(block, prop) in known}
            if isinstance(block, gr.Button) and isinstance(block.value, str) and block.value in known:
                texts["value"] = block.value
            choices = getattr(block, "choices", None) if _static_choices(block, known) else None
            if texts or choices:
                registry.static.append((block, texts, list(choices) if choices else None))
        return registry

    @property
    def outputs(self) -> list:
        return [component for component, _, _ in self.static] + self.markdown

    def updates(self, lang: str, markdown_values=()) -> list:
        """One gr.update per component of `outputs`, showing its texts in `lang`."""
        import gradio as gr

        result = []
        for _, texts, choices in self.static:
            props = {prop: translate(english, lang) for prop, english in texts.items()}
            if choices:
                props["choices"] = [(translate(label, lang), value) for label, value in choices]
            result.append(gr.update(**props))
        for value in markdown_values:
            result.append(retranslate(value, lang) if isinstance(value, str) and value else gr.skip())
        return result
