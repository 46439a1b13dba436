"""Content screening beyond the GX suite: language, PII and secrets, markup and prompt injection,
and near-duplicates by MinHash with banded LSH (no pairwise comparison over the corpus).

Each check returns a reason string or None; `screen_record` returns every failed check name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from shoefix_tasks.records import normalize_text

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]+")
# Frequent characters that exist only in Simplified Chinese: a zh-TW record full of them is zh-CN.
_SIMPLIFIED = set("这们说时会发对过还应该后与话问么边实现体网关国经页将门专业单温处鞋垫霉")
_TRADITIONAL_TWINS = set("這們說時會發對過還應該後與話問麼邊實現體網關國經頁將門專業單溫處")
_SIMPLIFIED -= set("鞋霉")  # shared by both scripts

PII_PATTERNS = {
    "email": re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),
    "phone": re.compile(r"(?:\+?\d{1,3}[\s-]?)?(?:\(?\d{2,4}\)?[\s-]?)\d{3,4}[\s-]?\d{3,4}\b(?![\s]*(?:%|°|mm|cm|km|g\b|mg|ml|hours?|days?))"),
    "tw_national_id": re.compile(r"\b[A-Z][12]\d{8}\b"),
    "us_ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "credit_card": re.compile(r"\b(?:\d[ -]?){13,16}\b"),
}
SECRET_PATTERNS = {
    "api_key": re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{20,}|"
                          r"\bxox[abpr]-[A-Za-z0-9-]{10,}|\bAIza[0-9A-Za-z_-]{30,}"),
    "private_key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password_assignment": re.compile(r"(?i)\b(?:password|passwd|secret|token)\s*[:=]\s*\S{6,}"),
}
MARKUP = re.compile(r"(?i)<\s*(?:script|iframe|object|embed|style|img|svg|a|div|span|p|br|html|body)\b[^>]*>|"
                    r"javascript:|\bon(?:load|error|click|mouseover)\s*=")
INJECTION = re.compile(
    r"(?i)\b(?:ignore|disregard|forget)\b.{0,30}\b(?:previous|prior|above|all|earlier)\b.{0,20}"
    r"\b(?:instructions?|prompts?|rules?)\b|\byou are now\b|\bsystem prompt\b|\bjailbreak\b|"
    r"<\|im_(?:start|end)\|>|\[/?INST\]|<<SYS>>|忽略(?:之前|先前|以上|所有).{0,6}(?:指令|指示|規則)|系統提示")


def _luhn_ok(digits: str) -> bool:
    nums = [int(d) for d in digits][::-1]
    total = sum(nums[0::2]) + sum(sum(divmod(2 * d, 10)) for d in nums[1::2])
    return total % 10 == 0


def detect_language(text: str) -> str:
    """'en', 'zh-TW', 'zh-CN' or 'unknown', from the script mix (enough to catch mislabels)."""
    cjk = _CJK.findall(text)
    latin = len(text) - len(_LATIN.sub("", text))  # per word, not per letter: far fewer regex matches
    if len(cjk) >= 0.3 * (len(cjk) + latin) and cjk:
        simp = sum(ch in _SIMPLIFIED for ch in cjk)
        trad = sum(ch in _TRADITIONAL_TWINS for ch in cjk)
        return "zh-CN" if simp > trad else "zh-TW"
    if latin >= 20 and len(cjk) <= 0.02 * latin:
        return "en"
    return "unknown"


_DIGIT_RUN = re.compile(r"\d\d\d")
# Cheap necessary conditions, checked before a pattern runs over the text (most records have no
# '@', no three digits in a row, no markup, no injection keyword): halves screening time.
_NEEDS = {"email": lambda t, digits: "@" in t, "phone": lambda t, digits: digits,
          "tw_national_id": lambda t, digits: digits, "us_ssn": lambda t, digits: digits,
          "private_key": lambda t, digits: "-----BEGIN" in t,
          "password_assignment": lambda t, digits: any(w in t.lower() for w in ("passw", "secret", "token"))}
_INJECTION_WORDS = ("ignore", "disregard", "forget", "you are now", "system prompt", "jailbreak", "<|im_",
                    "inst]", "<<sys>>", "忽略", "系統提示")


def find_pii(text: str) -> list[str]:
    digits = _DIGIT_RUN.search(text) is not None
    found = [name for name, pat in PII_PATTERNS.items() if name != "credit_card"
             and _NEEDS.get(name, lambda t, d: True)(text, digits) and pat.search(text)]
    for m in PII_PATTERNS["credit_card"].finditer(text):
        digits = re.sub(r"\D", "", m.group(0))
        if 13 <= len(digits) <= 16 and _luhn_ok(digits):
            found.append("credit_card")
            break
    found += [name for name, pat in SECRET_PATTERNS.items()
              if _NEEDS.get(name, lambda t, d: True)(text, digits) and pat.search(text)]
    return found


def redact_pii(text: str) -> tuple[str, list[str]]:
    """`text` with every PII and secret match replaced by `[<kind> removed]`, and the kinds found.

    For text that must be kept but may carry what a user typed about themselves (served questions
    in traces): intake quarantines such records instead, since a corpus must not teach PII.
    """
    found = find_pii(text)
    for kind in sorted(found, key=lambda k: k != "credit_card"):  # a card number also looks like a phone
        if kind == "credit_card":  # only Luhn-valid runs were found; the pattern alone is broader
            text = PII_PATTERNS[kind].sub(lambda m: "[credit_card removed]" if _luhn_ok(re.sub(r"\D", "", m.group(0)))
                                          else m.group(0), text)
        else:
            pattern = PII_PATTERNS.get(kind) or SECRET_PATTERNS[kind]
            text = pattern.sub(f"[{kind} removed]", text)
    return text, found


def _has_markup(text: str, lower: str) -> bool:
    return ("<" in text or "=" in text or "javascript:" in lower) and MARKUP.search(text) is not None


def _has_injection(text: str, lower: str) -> bool:
    return any(w in lower for w in _INJECTION_WORDS) and INJECTION.search(text) is not None


def screen_record(rec: dict) -> list[str]:
    """Failed content checks of one record (its strings only; types are the GX suite's job)."""
    q, a = rec.get("question"), rec.get("answer")
    if not isinstance(q, str) or not isinstance(a, str):
        return []
    failures = []
    lang = rec.get("lang")
    detected = detect_language(q + " " + a)
    if isinstance(lang, str) and detected != "unknown" and detected != lang:
        failures.append(f"language_mismatch({lang}!={detected})")
    pii = find_pii(q + "\n" + a)
    if pii:
        failures.append(f"pii({','.join(sorted(set(pii)))})")
    ql, al = q.lower(), a.lower()
    if _has_markup(q, ql) or _has_markup(a, al):
        failures.append("html_or_script")
    if _has_injection(q, ql) or _has_injection(a, al):
        failures.append("prompt_injection")
    return failures


# --- near-duplicates -------------------------------------------------------------------------
# 64 MinHash values over character 5-gram shingles; 16 bands of 4 rows. Two texts with shingle
# Jaccard J share at least one band with probability 1 - (1 - J^4)^16: 0.9999 at J = 0.8,
# 0.96 at J = 0.6, 0.08 at J = 0.3. Candidates are then confirmed by the estimated Jaccard.
NUM_PERM, BANDS = 64, 16
_ROWS = NUM_PERM // BANDS
_PRIME = (1 << 61) - 1
_rng = np.random.default_rng(20261129)
_A = _rng.integers(1, _PRIME, NUM_PERM, dtype=np.uint64) | np.uint64(1)
_B = _rng.integers(0, _PRIME, NUM_PERM, dtype=np.uint64)
NEAR_DUP_JACCARD = 0.7


_BASE = np.uint64(1_000_003)


def _shingles(text: str, k: int = 5) -> np.ndarray:
    """Hashes of the character k-grams: a polynomial over the code points, k vectorized steps
    (wrapping mod 2^64) instead of one Python `hash` per k-gram: no per-k-gram Python call, and the
    same in every process (Python's `hash` of a str is salted per process)."""
    t = re.sub(r"[\W_]+", " ", normalize_text(text)).strip()
    c = np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = max(1, c.size - k + 1)
    h = np.zeros(n, dtype=np.uint64)
    for j in range(min(k, c.size) if c.size > k else c.size):
        h = h * _BASE + (c[j:j + n] if c.size > k else c[j:j + 1])
    return h


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads the polynomial hashes over all 64 bits."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def minhash(text: str) -> np.ndarray:
    # 64 permutations a*h + b (a odd) of the mixed k-gram hashes, wrapping mod 2^64: a bijection
    # each, and cheaper than reducing mod a prime
    h = _mix(_shingles(text))
    return (np.outer(_A, h) + _B[:, None]).min(axis=1)


_MIX = np.random.default_rng(7).integers(1, 1 << 63, _ROWS, dtype=np.uint64) | np.uint64(1)
_TAGS = np.arange(BANDS, dtype=np.uint64) << np.uint64(60)  # the band number, in the top 4 bits
_MERGE_AT = 1 << 14  # recent entries kept in a dict before they are merged into the sorted array


def _band_keys(sig: np.ndarray) -> np.ndarray:
    """One uint64 per band: a random linear mix of its 4 values (wrapping, 60 bits kept) tagged
    with the band number. Two different bands collide with probability ~2^-60; a candidate is
    confirmed by its Jaccard estimate anyway."""
    mixed = (sig.reshape(BANDS, _ROWS) * _MIX).sum(axis=1, dtype=np.uint64)
    return (mixed >> np.uint64(4)) | _TAGS


class NearDupIndex:
    """Banded LSH over MinHash signatures: add texts, query for a near-duplicate's key.

    Sized for millions of entries (a 2 GB batch): signatures live in 16,384-row numpy blocks, and
    band keys in one sorted array (16 keys of 8 bytes + 16 row numbers of 8 bytes per entry), the
    latest additions in a dict until they are merged. ~0.8 KB per entry, against ~3 KB for dicts
    of bytes; a query is two vectorized binary searches.
    """

    _BLOCK = 1 << 14

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []
        self.keys: list[str] = []
        self._sorted = np.empty(0, dtype=np.uint64)
        self._sorted_idx = np.empty(0, dtype=np.int64)
        self._recent: dict[int, list[int]] = {}
        self._recent_from = 0  # entries from here on are in _recent, not yet in _sorted

    def __len__(self) -> int:
        return len(self.keys)

    def _sig(self, idx: int) -> np.ndarray:
        return self._blocks[idx // self._BLOCK][idx % self._BLOCK]

    def add(self, key: str, text: str, sig: np.ndarray | None = None) -> None:
        sig = minhash(text) if sig is None else sig
        idx = len(self.keys)
        if idx % self._BLOCK == 0:
            self._blocks.append(np.empty((self._BLOCK, NUM_PERM), dtype=np.uint64))
        self._blocks[-1][idx % self._BLOCK] = sig
        self.keys.append(key)
        for k in _band_keys(sig).tolist():
            self._recent.setdefault(k, []).append(idx)
        if idx + 1 - self._recent_from >= _MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        lo, hi = self._recent_from, len(self.keys)
        keys = np.concatenate([_band_keys(self._sig(i)) for i in range(lo, hi)])
        idx = np.repeat(np.arange(lo, hi, dtype=np.int64), BANDS)
        order = np.argsort(keys, kind="stable")
        keys, idx = keys[order], idx[order]
        at = np.searchsorted(self._sorted, keys, "right")  # insertion: O(N) copy, no full re-sort
        self._sorted, self._sorted_idx = np.insert(self._sorted, at, keys), np.insert(self._sorted_idx, at, idx)
        self._recent, self._recent_from = {}, hi

    def query(self, text: str, sig: np.ndarray | None = None) -> str | None:
        sig = minhash(text) if sig is None else sig
        bands = _band_keys(sig)
        left = np.searchsorted(self._sorted, bands, "left")
        right = np.searchsorted(self._sorted, bands, "right")
        candidates = [i for lo, hi in zip(left.tolist(), right.tolist(), strict=True) if hi > lo
                      for i in self._sorted_idx[lo:hi].tolist()]
        if self._recent:
            candidates += [i for k in bands.tolist() for i in self._recent.get(k, ())]
        for idx in dict.fromkeys(candidates):
            if float((self._sig(idx) == sig).mean()) >= NEAR_DUP_JACCARD:
                return self.keys[idx]
        return None

    @classmethod
    def of(cls, items: Iterable[tuple[str, str]]) -> NearDupIndex:
        index = cls()
        for key, text in items:
            index.add(key, text)
        return index
