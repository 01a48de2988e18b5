"""What a job's tokens cost: core-seconds (the CPU time of the worker processes, every Numba thread
included, from the end of each worker's warm-up) per million prompt and per million generated tokens,
and, with a node price (dollars per node-hour), the dollars of the nodes' time per million tokens.
Also the dry run's estimate of a job's hours and dollars from measured prefill and decode rates.
No Ray: the driver, the CLI and tests use it without it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PER = 1e6  # figures are per million tokens


def _per_million(amount: float | None, tokens: int) -> float | None:
    return None if amount is None or tokens <= 0 else amount / tokens * PER


@dataclass(frozen=True)
class JobCost:
    """This run's cost. `core_s`: the worker processes' CPU seconds; `node_s`: the nodes that ran
    workers x this run's processing time (what is paid for at `node_price` dollars per node-hour).
    A figure per million tokens is None when there were no such tokens; dollars are None without a price."""

    core_s: float
    node_s: float
    prompt_tokens: int
    generated_tokens: int
    node_price: float | None = None

    @property
    def dollars(self) -> float | None:
        return None if self.node_price is None else self.node_s / 3600.0 * self.node_price

    @property
    def core_s_per_m_prompt_tokens(self) -> float | None:
        return _per_million(self.core_s, self.prompt_tokens)

    @property
    def core_s_per_m_generated_tokens(self) -> float | None:
        return _per_million(self.core_s, self.generated_tokens)

    @property
    def dollars_per_m_prompt_tokens(self) -> float | None:
        return _per_million(self.dollars, self.prompt_tokens)

    @property
    def dollars_per_m_generated_tokens(self) -> float | None:
        return _per_million(self.dollars, self.generated_tokens)

    def to_dict(self) -> dict:
        """The fields and every figure (what _progress.json, status and _manifest.json hold)."""
        return dict(asdict(self), dollars=self.dollars,
                    core_s_per_m_prompt_tokens=self.core_s_per_m_prompt_tokens,
                    core_s_per_m_generated_tokens=self.core_s_per_m_generated_tokens,
                    dollars_per_m_prompt_tokens=self.dollars_per_m_prompt_tokens,
                    dollars_per_m_generated_tokens=self.dollars_per_m_generated_tokens)

    def line(self) -> str:
        """One line for the summary and `status`."""
        def fmt(x: float | None, unit: str) -> str:
            return "n/a" if x is None else f"{x:,.0f} {unit}" if unit == "core-s" else f"${x:,.4f}"

        text = (f"cost: {self.core_s:,.1f} core-seconds; {fmt(self.core_s_per_m_generated_tokens, 'core-s')} per "
                f"million generated tokens, {fmt(self.core_s_per_m_prompt_tokens, 'core-s')} per million prompt tokens")
        if self.node_price is not None:
            text += (f"; at ${self.node_price:g} a node-hour ${self.dollars:,.4f}: "
                     f"{fmt(self.dollars_per_m_generated_tokens, '$')} per million generated, "
                     f"{fmt(self.dollars_per_m_prompt_tokens, '$')} per million prompt tokens")
        return text


@dataclass(frozen=True)
class CostEstimate:
    """The dry run's estimate: a job's tokens at rates measured on one node (`calibrate`), spread over
    `nodes` nodes that each run one worker."""

    rows: int
    prompt_tokens: int  # estimated from a sample of rows
    generated_tokens: int  # at most: every row generates max_tokens
    prefill_tokens_per_s: float  # one worker
    decode_tokens_per_s: float  # one worker, all its slots decoding
    nodes: int
    node_price: float | None = None
    cached_tokens: int = 0  # of prompt_tokens, those the prefix cache would give (estimated from the sample)

    @property
    def hours(self) -> float:
        """Wall hours: each node prefills (what the prefix cache does not give) and decodes its share of
        the tokens in turn."""
        seconds = ((self.prompt_tokens - self.cached_tokens) / self.prefill_tokens_per_s
                   + self.generated_tokens / self.decode_tokens_per_s)
        return seconds / max(self.nodes, 1) / 3600.0

    @property
    def dollars(self) -> float | None:
        return None if self.node_price is None else self.hours * max(self.nodes, 1) * self.node_price

    def line(self) -> str:
        cached = f" (~{self.cached_tokens:,} of them from the prefix cache)" if self.cached_tokens else ""
        text = (f"estimate: {self.rows} rows, ~{self.prompt_tokens:,} prompt{cached} + at most "
                f"{self.generated_tokens:,} generated tokens; measured on this node: prefill {self.prefill_tokens_per_s:,.1f} tokens/s, decode "
                f"{self.decode_tokens_per_s:,.1f} tokens/s a worker; on {self.nodes} node(s) about "
                f"{self.hours:,.3f} hours ({self.hours * 3600:,.1f} s)")
        if self.dollars is not None:
            text += f", ${self.dollars:,.2f} at ${self.node_price:g} a node-hour"
        return text
