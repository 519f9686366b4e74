"""Settings of the bootstrap (stages 1-3 and stage 5's teacher targets); config key ``data.bootstrap``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from prism_lightning.backbone import BackboneConfig
from prism_lightning.chat_format import PLACEMENTS, ThinkingFormat
from prism_lightning.contexts import LENGTHS
from prism_lightning.engines import GenerationConfig
from prism_lightning.errors import ConfigError
from prism_lightning.generation import SamplingConfig

VERDICT_RULES: tuple[str, ...] = ("logprob", "strict")
VERIFIERS: tuple[str, ...] = ("self", "program")
QUERY_PROMPTS: tuple[str, ...] = ("describe", "persona_text", "examples")


@dataclass
class JudgeConfig:
    """The judge of stage 3 when it is not the base model (config key ``data.bootstrap.judge``): another
    local model (``{model: ...}``, the backbone keys) or an OpenAI-compatible endpoint (``{base_url: ...,
    model: ...}``, the endpoint keys); one or the other, never both.

    Args:
        model: a local model (a Hugging Face id, a local directory or an embedded name), or with
            ``base_url`` the model name the endpoint serves.
        base_url: an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1; null: a local model.
        api_key_env: with ``base_url``: the name of the environment variable that holds the API key (the
            key itself never goes into a config file, a hash or a log); null: no key is sent.
        timeout: with ``base_url``: seconds one request may take.
        concurrency: with ``base_url``: requests in flight at once.
        dtype: a local judge's dtype (as ``backbone.dtype``).
        trust_remote_code: a local judge may run its repository's own code.
        base_system_prompt: a local judge's no-persona system prompt (as ``backbone.base_system_prompt``).
        attn_implementation: a local judge's attention implementation.
    """

    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    timeout: float = 120.0
    concurrency: int = 8
    dtype: str = "auto"
    trust_remote_code: bool = False
    base_system_prompt: str | None = None
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            where = "the model name the endpoint serves" if self.base_url else "a local model"
            raise ConfigError(f"bootstrap.judge.model is missing: give {where}.")
        local = [f.name for f in fields(BackboneConfig) if f.name != "model"]
        remote = ("api_key_env", "timeout", "concurrency")
        if self.base_url is not None:
            if not str(self.base_url).startswith(("http://", "https://")):
                raise ConfigError(
                    f"bootstrap.judge.base_url must start with http:// or https://, got {self.base_url!r}."
                )
            mixed = [k for k in local if getattr(self, k) != getattr(BackboneConfig, k)]
            if mixed:
                raise ConfigError(
                    f"bootstrap.judge sets base_url (an endpoint) and {', '.join(mixed)} (a local model's "
                    "keys): a judge is one or the other."
                )
            if float(self.timeout) <= 0 or int(self.concurrency) < 1:
                raise ConfigError("bootstrap.judge.timeout must be > 0 and bootstrap.judge.concurrency >= 1.")
        else:
            defaults = {f.name: f.default for f in fields(JudgeConfig)}
            mixed = [k for k in remote if getattr(self, k) != defaults[k]]
            if mixed:
                raise ConfigError(
                    f"bootstrap.judge sets {', '.join(mixed)}, which only an endpoint takes: add base_url, "
                    "or drop them for a local judge."
                )
            self.backbone()  # a bad dtype fails here

    @classmethod
    def from_value(cls, value: Any) -> JudgeConfig | None:
        """A judge from YAML/kwargs (a mapping), a :class:`BackboneConfig` (a local model), or null."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, BackboneConfig):
            return cls(**asdict(value))
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                keys = ", ".join(f.name for f in fields(cls))
                raise ConfigError(f"unknown bootstrap.judge key(s) {', '.join(unknown)}; valid keys: {keys}.")
            return cls(**value)
        raise ConfigError(
            "bootstrap.judge must be a mapping ({model: ...} or {base_url: ..., model: ...}), "
            f"got {value!r}."
        )

    @property
    def is_endpoint(self) -> bool:
        return self.base_url is not None

    def backbone(self) -> BackboneConfig:
        """A local judge as the backbone it loads."""
        return BackboneConfig(**{f.name: getattr(self, f.name) for f in fields(BackboneConfig)})

    def api_key(self) -> str | None:
        """The endpoint's API key from the environment (None without ``api_key_env``)."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"bootstrap.judge.api_key_env names ${self.api_key_env}, which is not set: export the "
                "endpoint's API key under that name."
            )
        return key

    def identity(self, rule: str) -> dict[str, Any]:
        """What of the judge enters the verdict stage's hash: a local judge's backbone keys (as before
        endpoints existed); an endpoint's URL and model (never the key), and whether its rows hold option
        scores (asked for under the logprob rule only, so its judgments serve one rule)."""
        if not self.is_endpoint:
            return asdict(self.backbone())
        return {"base_url": self.base_url, "model": self.model, "option_scores": rule == "logprob"}


@dataclass
class BootstrapConfig:
    """Everything that decides what the bootstrap produces.

    Args:
        personas: names from the persona library (list or comma-separated string), or ``all``.
        context_files: extra personas/contexts: YAML files with the library's schema (``kind: reference``
            for a document such as a fact sheet), or any .txt/.md file (a reference context); a shipped
            example as ``examples/<name>.yaml``. See ``contexts.load_context_file``.
        queries_per_persona: queries each persona writes (the paper uses 50).
        persona_length: min, short or long persona text.
        placement: where the persona goes: system or user (templates without a system role use user).
        query_prompt: what the query writer is told about a persona: describe (its one-line description
            and expertise) or persona_text (its text at ``persona_length``, as the reference scripts do).
            Reference contexts always show their text. examples: the writer continues a numbered list
            of ``query_examples`` of the context's ``example_queries`` (a different draw per query);
            small models stay on topic this way (not in the paper).
        query_examples: how many of a context's example_queries prime each query (query_prompt: examples).
        query_temperature: sampling temperature of stage 1 (queries).
        query_max_new_tokens: longest query in tokens.
        min_query_chars: shorter queries are dropped.
        query_stop_at_newline: stop a query at its first line break (only the first line is kept).
        answer_temperature: sampling temperature of stage 2 (answers with and without the persona).
        answer_max_new_tokens: longest answer in tokens.
        answer_samples: persona answers sampled per query (1: the paper). With k > 1 the program
            verifier compares each with the base answer and the first that wins is kept as the row's
            persona answer (best-of-k, i.e. rejection sampling), so a query counts as helped by the
            context when the context can help it, not only when one draw happened to; needs
            ``verifier: program``.
        top_p: nucleus mass of stages 1 and 2 (1: off).
        top_k: stages 1 and 2 sample among this many most likely tokens (0: off).
        repetition_penalty: stages 1 and 2 penalise tokens already in the prompt or answer (1: off).
            The paper's reference inherits these three from the model's ``generation_config.json``
            (Qwen2.5: 0.8, 20, 1.05); the 7B configs set them so.
        judge: a different judge: another local model ({model: ...}) or an OpenAI-compatible endpoint
            ({base_url: ..., model: ..., api_key_env: NAME}), see :class:`JudgeConfig`; null judges with
            the base model.
        judge_max_new_tokens: length of the free-text verdict.
        thinking_max_new_tokens: a reasoning model's budget of thinking tokens (its chat template opens a
            ``<think>`` block, e.g. DeepSeek-R1-Distill): queries, answers and the judge first think for at
            most this many tokens; the block is then closed (for the model when the budget runs out; counted
            in each stage's stats) and the query, answer or verdict is what follows it. Unused (and out of
            every hash) for a model that does not think.
        judge_sees_reference: the judge is shown a reference context's document (at ``persona_length``)
            when it compares that context's answers; personas are judged on the question alone (the paper).
        verdict_rule: logprob (the persona's log-odds summed over both judge orders > 0; never
            unparsable, cancels position bias) or strict (the paper: the free-text verdict prefers the
            persona in both orders). Both are stored; switching relabels without re-judging.
        verifier: who decides that the context helped (stage 3): ``self`` (a model judges each pair in
            both orders: the base model, or ``judge`` when set; the paper) or ``program`` (the callables of
            ``verifier_programs``), or a list of both: the first decides the gate target, the others are
            recorded beside it with their agreement, so the noise of self-judgment can be measured.
        verifier_programs: ``{context name: "module:function"}``, one per context when ``program`` is a
            verifier; e.g. ``prism_lightning.bootstrap.verifiers:fact_sheet`` (see that module).
        teacher_top_k: teacher logits kept per response token.
        max_response_tokens: the teacher/student response is cut to this many tokens.
        batch_size: rows per generation batch (each row may expand to two prompts).
        seed: base of the per-row seeds (rows do not depend on batching or the number of processes).
        generation: which engine generates (backend: hf | vllm) and the vLLM engine's settings, see
            :class:`~prism_lightning.engines.GenerationConfig`.
    """

    personas: list[str] | str = "all"
    context_files: list[str] = field(default_factory=list)
    queries_per_persona: int = 4
    persona_length: str = "short"
    placement: str = "system"
    query_prompt: str = "describe"
    query_examples: int = 3
    query_temperature: float = 0.9
    query_max_new_tokens: int = 200
    min_query_chars: int = 16
    query_stop_at_newline: bool = True
    answer_temperature: float = 0.7
    answer_max_new_tokens: int = 96
    answer_samples: int = 1
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    judge: JudgeConfig | None = None
    judge_max_new_tokens: int = 8
    thinking_max_new_tokens: int = 1024
    judge_sees_reference: bool = True
    verdict_rule: str = "logprob"
    verifier: list[str] | str = "self"
    verifier_programs: dict[str, str] = field(default_factory=dict)
    teacher_top_k: int = 64
    max_response_tokens: int = 512
    batch_size: int = 16
    seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        self.generation = GenerationConfig.from_value(self.generation)
        if self.verdict_rule not in VERDICT_RULES:
            raise ConfigError(
                f"Unknown verdict_rule {self.verdict_rule!r}; choose one of {', '.join(VERDICT_RULES)}."
            )
        if self.query_prompt not in QUERY_PROMPTS:
            raise ConfigError(
                f"Unknown query_prompt {self.query_prompt!r}; choose one of {', '.join(QUERY_PROMPTS)}."
            )
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ConfigError(f"bootstrap.top_p must be in (0, 1], got {self.top_p}.")
        if int(self.top_k) < 0:
            raise ConfigError(f"bootstrap.top_k must be >= 0 (0: off), got {self.top_k}.")
        if not float(self.repetition_penalty) > 0:
            raise ConfigError(
                f"bootstrap.repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}."
            )
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"Unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}.")
        if self.persona_length not in LENGTHS:
            raise ConfigError(
                f"Unknown persona_length {self.persona_length!r}; choose one of {', '.join(LENGTHS)}."
            )
        if isinstance(self.context_files, str):
            self.context_files = [self.context_files]
        positive = (
            "queries_per_persona",
            "query_max_new_tokens",
            "query_examples",
            "answer_max_new_tokens",
            "answer_samples",
            "judge_max_new_tokens",
            "thinking_max_new_tokens",
            "teacher_top_k",
            "max_response_tokens",
            "batch_size",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"bootstrap.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("query_temperature", "answer_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"bootstrap.{name} must be >= 0, got {getattr(self, name)}.")
        self.judge = JudgeConfig.from_value(self.judge)  # plain dicts from YAML / kwargs
        if isinstance(self.verifier, str):
            self.verifier = [v.strip() for v in self.verifier.split(",") if v.strip()]
        self.verifier = list(self.verifier)
        if not self.verifier or len(set(self.verifier)) != len(self.verifier):
            raise ConfigError(f"bootstrap.verifier must name each verifier once, got {self.verifier}.")
        unknown = [v for v in self.verifier if v not in VERIFIERS]
        if unknown:
            raise ConfigError(f"Unknown bootstrap.verifier {unknown}; choose from {', '.join(VERIFIERS)}.")
        if int(self.answer_samples) > 1 and self.verifier != ["program"]:
            raise ConfigError(
                f"bootstrap.answer_samples={self.answer_samples} needs bootstrap.verifier: program (only a "
                "program can check every sampled answer; a self-judge would judge k pairs per query)."
            )
        self.check_personas()
        self.check_programs()

    def query_sampling(self) -> SamplingConfig:
        return self._sampling(self.query_max_new_tokens, self.query_temperature)

    def answer_sampling(self) -> SamplingConfig:
        return self._sampling(self.answer_max_new_tokens, self.answer_temperature)

    def _sampling(self, max_new_tokens: int, temperature: float) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(self.top_p),
            top_k=int(self.top_k),
            repetition_penalty=float(self.repetition_penalty),
        )

    def sampling_filters(self) -> dict[str, float]:
        """The filters that differ from off (part of the query and answer stage hashes; none by default,
        so hashes from before these keys existed stay valid)."""
        off = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
        return {k: getattr(self, k) for k, v in off.items() if getattr(self, k) != v}

    def thinking_key(self, fmt: ThinkingFormat | None) -> dict[str, object]:
        """What thinking adds to the hash of a stage whose model has thinking format ``fmt``: nothing for a
        model that does not think, so its hashes stay as they were before thinking was handled."""
        if fmt is None:
            return {}
        return {"thinking": {"max_new_tokens": self.thinking_max_new_tokens, **fmt.identity()}}

    def verifier_key(self) -> dict[str, object]:
        """The verifier settings that enter the verdict stage's hash: nothing for the default (self), so
        runs from before verifiers existed keep their hashes."""
        if self.verifier == ["self"]:
            return {}
        return {
            "verifier": list(self.verifier),
            "verifier_programs": dict(sorted(self.verifier_programs.items())),
        }

    def check_programs(self) -> None:
        """With ``program`` among the verifiers, every context needs an importable program, and every
        program a context; checked before any model loads."""
        from prism_lightning.bootstrap.verifiers import load_program
        from prism_lightning.contexts import ContextLibrary

        if "program" not in self.verifier:
            if self.verifier_programs:
                raise ConfigError(
                    "bootstrap.verifier_programs is set but `program` is not a bootstrap.verifier."
                )
            return
        names = [c.name for c in ContextLibrary.from_config(self.context_files).select(self.personas)]
        missing = [n for n in names if n not in self.verifier_programs]
        if missing:
            raise ConfigError(
                f"bootstrap.verifier_programs has no program for {missing} (verifier: program)."
            )
        extra = sorted(set(self.verifier_programs) - set(names))
        if extra:
            raise ConfigError(
                f"bootstrap.verifier_programs names contexts not in bootstrap.personas: {extra}."
            )
        for spec in self.verifier_programs.values():
            load_program(spec)

    def check_personas(self) -> None:
        """Unknown persona names and unreadable context files fail at construction, before any work."""
        from prism_lightning.contexts import ContextLibrary

        library = ContextLibrary.from_config(self.context_files)
        if isinstance(self.personas, list | tuple) and not self.personas:
            names = ", ".join(library.names)
            raise ConfigError(f"bootstrap.personas is empty; give names from: {names}, or all.")
        selected = library.select(self.personas)
        if self.query_prompt == "examples":
            short = [c.name for c in selected if len(c.example_queries) < self.query_examples]
            if short:
                raise ConfigError(
                    f"bootstrap.query_prompt is examples, but {short} give fewer than "
                    f"bootstrap.query_examples={self.query_examples} example_queries in their context file."
                )
