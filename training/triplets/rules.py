"""The offline, deterministic triplet generator: paraphrases and negations by rewrite rules.

Paraphrases keep the meaning and change the wording:

- `there`: "A dog is sitting on a bench" <-> "There is a dog sitting on a bench";
- `relative`: "A cat that is sitting in a sink" <-> "A cat sitting in a sink";
- `passive`: "A man is holding an umbrella" -> "An umbrella is being held by a man";
- `coordination`: "a fork and a knife" -> "a knife and a fork";
- `synonyms`: lexicon.SYNONYMS ("picture" -> "photo", "next to" -> "beside", ...), on top of the above;
- `frame`, the last resort: "A cat is way up in a tree" -> "In this picture, a cat is way up in a tree".

Negations are one minimal edit that makes the caption false for its image, in the spirit of
CC-Neg and SugarCrepe (lexicon.py holds the word lists):

- `swap`: two attributes or two objects trade places ("a red car and a blue bus" -> "a blue car and a red bus");
- `attribute`: an attribute becomes its opposite ("a large dog" -> "a small dog");
- `relation`: a relation or action changes ("on a table" -> "under a table", "sitting" -> "standing");
- `object`: an object is replaced ("a dog" -> "a cat");
- `negate`: a negation is inserted or removed ("is sitting" -> "is not sitting", "without" -> "with").

Which negation family comes first is rotated by a hash of the caption, so a data set gets a mix of
all of them while every caption always gets the same answer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from .lexicon import (
    ANIMATE,
    ATTRIBUTE_WORDS,
    AUXILIARIES,
    CONJUNCTIONS,
    DETERMINERS,
    DETERMINERS_PLURAL,
    DETERMINERS_SINGULAR,
    ING_FORMS,
    MOTION_VERBS,
    OBJECTS,
    OPPOSITE_ATTRIBUTES,
    PARTICIPLES,
    POSTURES,
    PREPOSITIONS,
    RELATIONS,
    RELATIVE,
    SINGULAR_OBJECTS,
    SYNONYMS,
    THIRD_PERSON_FORMS,
    TRANSITIVE,
    UNCOUNTABLE,
    VERB_FORMS,
)
from .validate import select_texts

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['\u2019\-][A-Za-z0-9]+)*|\S")
_SPACE_BEFORE = re.compile(r" ([.,!?;:%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{]) ")

# Compounds whose words must not be rewritten one by one ("hot dog" is no dog, "little league" no size).
PROTECTED = [tuple(phrase.split()) for phrase in (
    "little league", "hot dog", "hot dogs", "teddy bear", "teddy bears", "big horn", "polar bear", "polar bears",
    "black and white", "stuffed animal", "stuffed animals", "living room", "fire hydrant", "double decker",
    "traffic light", "traffic lights", "street sign", "street signs", "light pole", "street light", "street lights",
    "stop sign", "new york",
    "each other", "one another", "hand mirror", "cell phone", "bus stop", "train station", "train tracks",
    "filled with", "covered with", "topped with", "lined with", "decorated with", "along with", "playing with",
    "made with", "loaded with", "dressed in", "full of", "top of", "in front of", "left behind", "pick up",
)]
_PROTECTED_BY_FIRST: dict[str, list[tuple[str, ...]]] = {}
for _phrase in PROTECTED:
    _PROTECTED_BY_FIRST.setdefault(_phrase[0], []).append(_phrase)
Tokens = list[str]


def tokenize(text: str) -> Tokens:
    return _TOKEN.findall(text)


def detokenize(tokens: Tokens) -> str:
    text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", " ".join(tokens)))
    parts = text.split('"')  # straight quotes alternate opening and closing: 'reads "Stop" here'
    if len(parts) % 2 == 1:
        text = "".join('"' + part.strip() + '"' if i % 2 else part for i, part in enumerate(parts))
    return text


def _lower(tokens: Tokens) -> list[str]:
    return [token.lower() for token in tokens]


def _is_word(token: str) -> bool:
    return token[:1].isalnum()


def _match_case(template: str, word: str) -> str:
    if len(template) > 3 and template.isupper():
        return word.upper()
    if len(template) > 1 and template.isupper():  # an acronym ("TV"): its casing is no style to copy
        return word
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _lower_first(tokens: Tokens) -> Tokens:
    """Un-capitalize a phrase that leaves the start of the sentence (only common words: keep 'Apple')."""
    if not tokens or not tokens[0][:1].isupper() or len(tokens[0]) > 1 and tokens[0].isupper():
        return tokens  # already lower case, or an acronym
    word = tokens[0].lower()
    if word in DETERMINERS or word in OBJECTS or word in ATTRIBUTE_WORDS or word in ANIMATE:
        return [word] + tokens[1:]
    return tokens


def finish(tokens: Tokens, caption: str) -> str:
    """Detokenize with the caption's casing conventions (all caps stays all caps, first letter as the caption)."""
    text = detokenize(tokens)
    letters = [c for c in caption if c.isalpha()]
    if letters and all(c.isupper() for c in letters):
        return text.upper()
    if text and caption[:1].isupper():
        return text[0].upper() + text[1:]
    if text and caption[:1].islower():
        first = tokens[0]
        if first.lower() in DETERMINERS or first.lower() in ("there",):
            return text[0].lower() + text[1:]
    return text


def _plain_verb_at(words: list[str], i: int) -> bool:
    """A base-form verb after a plural subject ("two dogs sit on ..."): the next word must not continue a noun
    ("a hot dog stand" is a stand)."""
    if i >= len(words) or not _verb_at(words, i) or VERB_FORMS.get(words[i], ("",))[0] != words[i]:
        return False
    following = words[i + 1] if i + 1 < len(words) else ""
    return following == "" or following in PREPOSITIONS or following in DETERMINERS or not _is_word(following) \
        or following in ("together", "around", "outside", "inside", "here", "there")


def _stopper(word: str) -> bool:
    """Does this (lower-case) token end a noun phrase?"""
    return (not _is_word(word) or word in PREPOSITIONS or word in CONJUNCTIONS or word in RELATIVE
            or word in AUXILIARIES or word in ING_FORMS or word in THIRD_PERSON_FORMS or word == "not")


def _noun_phrase_end(words: list[str], start: int, allow_of: bool = True) -> int:
    """End (exclusive) of the determiner-led noun phrase starting at `start`; `start` when there is none."""
    if start >= len(words) or words[start] not in DETERMINERS:
        return start
    end = start + 1
    while end < len(words) and not _stopper(words[end]) and words[end] not in DETERMINERS and end - start <= 5 \
            and not (_plain_verb_at(words, end) and _plural(words[start:end])):
        end += 1
    if end == start + 1:
        return start
    if allow_of and end + 1 < len(words) and words[end] == "of":  # "a slice of pizza" is one phrase
        if words[end + 1] in DETERMINERS:
            inner = _noun_phrase_end(words, end + 1, allow_of=False)
            return inner if inner > end + 1 else end
        inner = end + 1
        while inner < len(words) and not _stopper(words[inner]) and words[inner] not in DETERMINERS:
            inner += 1
        return inner if inner > end + 1 else end
    return end


def _plural(words: list[str]) -> bool:
    """Is this noun phrase plural? Judged by its determiner, else by its last word."""
    if not words:
        return False
    if words[0] in DETERMINERS_PLURAL or words[0].isdigit() or words[:2] == ["a", "few"] \
            or words[:3] == ["a", "couple", "of"]:
        return True
    if words[0] in DETERMINERS_SINGULAR:
        return False
    head = words[words.index("of") - 1] if "of" in words[1:] else words[-1]
    return head.endswith("s") and not head.endswith("ss") or head in ("men", "women", "people", "children")


def _verb_at(words: list[str], i: int) -> bool:
    """Is the verb-looking token at i a verb? After a determiner, preposition or attribute it is a noun
    ("with skis")."""
    if i == 0:
        return False
    before = words[i - 1]
    return not (before in DETERMINERS or before in PREPOSITIONS or before in ATTRIBUTE_WORDS or before == "and")


def _clean_subject(words: list[str]) -> bool:
    """A subject we can move: starts with a determiner, at most 8 words, no verb, clause or punctuation inside."""
    if not words or words[0] not in DETERMINERS or len(words) > 8:
        return False
    return all(_is_word(w) and w not in RELATIVE and w not in AUXILIARIES and w not in ING_FORMS
               and w not in THIRD_PERSON_FORMS and w not in ("and", "not", "other") for w in words[1:])


# ----------------------------------------------------------------------------- paraphrase rules


def there_rule(tokens: Tokens) -> Tokens | None:
    """'A dog is sitting ...' / 'Two dogs sitting ...' / 'A dog sits ...' <-> 'There is a dog sitting ...'."""
    words = _lower(tokens)
    if len(words) >= 4 and words[0] == "there" and words[1] in ("is", "are"):
        for j in range(3, min(len(words), 12)):
            if words[j] in RELATIVE and j + 2 < len(words) and words[j + 1] in ("is", "are") \
                    and words[j + 2] in ING_FORMS:
                subject, rest = tokens[2:j], tokens[j + 2:]
            elif words[j] in ING_FORMS:
                subject, rest = tokens[2:j], tokens[j:]
            else:
                continue
            if not all(_is_word(t) for t in subject) or any(w in RELATIVE for w in _lower(subject)):
                return None
            return subject + [words[1]] + rest
        place = _noun_phrase_end(words, 2)  # "There are two slices of pizza on a plate" -> "Two slices ... are on"
        if place > 2 and place < len(words) and words[place] in PREPOSITIONS and words[place] != "of":
            return tokens[2:place] + [words[1]] + tokens[place:]
        return None
    bare_plural = len(words) > 2 and words[1] == "are" and _is_word(words[0]) and not _stopper(words[0]) \
        and words[0] not in DETERMINERS  # "People are walking ..."
    if not words or not bare_plural and words[0] not in (DETERMINERS_SINGULAR | DETERMINERS_PLURAL) - {
            "this", "that", "each", "every", "another", "both"}:
        return None
    finite = any(w in AUXILIARIES or w in THIRD_PERSON_FORMS and _verb_at(words, i) or _plain_verb_at(words, i)
                 for i, w in enumerate(words))
    subject_end = _noun_phrase_end(words, 0)
    for j in range(1, min(len(words), 10)):
        if words[j] in ("is", "are") or (words[j] in ING_FORMS or words[j] in THIRD_PERSON_FORMS) \
                and _verb_at(words, j) or _plain_verb_at(words, j) and _plural(words[:j]):
            break
        if not finite and (words[j] in PARTICIPLES or words[j] in PREPOSITIONS and words[j] not in
                           ("of", "while", "as", "like", "to", "for", "from", "after", "before", "up", "down", "out")):
            # a caption without verb: "A vase of flowers on a table" -> "There is a vase of flowers on a table"
            if not _clean_subject(words[:j]) or subject_end not in (j, j + (words[j] in PARTICIPLES)):
                return None  # words between the subject and here may hide an unknown verb ("people try to")
            if words[0] in DETERMINERS_SINGULAR and "of" not in words[:j] and words[j - 1].endswith("s") \
                    and not words[j - 1].endswith(("ss", "us", "is")) and words[j - 1] not in OBJECTS:
                return None  # "a cat perches on": after "a", a word in -s is a verb we do not know
            return ["There", "are" if _plural(words[:j]) else "is"] + _lower_first(tokens[:j]) + tokens[j:]
    else:
        return None
    subject_words = words[:j]
    if not (bare_plural or _clean_subject(subject_words)):
        return None
    after = words[j + 1] if j + 1 < len(words) else ""
    subject = _lower_first(tokens[:j])
    if bare_plural and subject[0].istitle():  # "Carrots are ..." -> "There are carrots ..."
        subject = [subject[0].lower()] + subject[1:]
    if words[j] in ("is", "are"):
        participle = after in PARTICIPLES or after.endswith("ed") and len(after) > 4
        if not (after in ING_FORMS or after in PREPOSITIONS or participle) or after in ("of", "to", "as", "like"):
            return None
        return ["There", words[j]] + subject + tokens[j + 1:]
    if words[j] in ING_FORMS:
        return ["There", "are" if _plural(subject_words) else "is"] + subject + tokens[j:]
    if words[j] not in THIRD_PERSON_FORMS:  # "Two dogs sit on a bench" -> "There are two dogs sitting on a bench"
        return ["There", "are" if _plural(subject_words) else "is"] + subject + [
            _match_case(tokens[j], VERB_FORMS[words[j]][2])] + tokens[j + 1:]
    # third person singular: "A woman sits at a counter" -> "There is a woman sitting at a counter"
    if _plural(subject_words) or not (after == "" or after in PREPOSITIONS or after in DETERMINERS
                                      or not _is_word(after)):
        return None
    return ["There", "is"] + subject + [_match_case(tokens[j], VERB_FORMS[words[j]][2])] + tokens[j + 1:]


def relative_rule(tokens: Tokens) -> Tokens | None:
    """'A cat that is sitting in a sink' <-> 'A cat sitting in a sink' (in captions without a main verb)."""
    words = _lower(tokens)
    for j in range(1, len(words) - 2):
        if words[j] in RELATIVE and words[j + 1] in ("is", "are") and words[j + 2] in ING_FORMS:
            return tokens[:j] + tokens[j + 2:]
    if any(w in ("is", "are") or w in THIRD_PERSON_FORMS for w in words) or words[0] == "there":
        return None
    for j in range(1, min(len(words), 10)):
        if words[j] in ING_FORMS and _verb_at(words, j):
            if not _clean_subject(words[:j]) or any(w in PREPOSITIONS and w != "of" for w in words[:j]):
                return None  # "a wall with clocks hanging": which noun hangs decides "is" or "are"
            return tokens[:j] + ["that", "are" if _plural(words[:j]) else "is"] + tokens[j:]
    return None


def with_rule(tokens: Tokens) -> Tokens | None:
    """'A plate with a donut' <-> 'A plate that has a donut';
    'A bathroom has red walls' -> 'A bathroom with red walls'."""
    words = _lower(tokens)
    for j in range(1, min(len(words) - 1, 9)):
        if words[j] in RELATIVE and words[j + 1] in ("has", "have") and j + 2 < len(words) \
                and words[j + 2] not in ("been", "just", "no", "not"):
            return tokens[:j] + [_match_case(tokens[j + 1], "with")] + tokens[j + 2:]
        if words[j] in ("has", "have") and words[j + 1] not in ("been", "just", "no", "not", "to") \
                and _clean_subject(words[:j]) and words[j + 1] not in ING_FORMS:
            return tokens[:j] + [_match_case(tokens[j], "with")] + tokens[j + 1:]
        if not _is_word(words[j]) or words[j] in AUXILIARIES or words[j] in ING_FORMS or words[j] in THIRD_PERSON_FORMS:
            return None
        if words[j] == "with":
            if not _clean_subject(words[:j]) or any(w in PREPOSITIONS for w in words[:j]) or words[j + 1] == "no":
                return None
            if any(w in ("is", "are") or w in THIRD_PERSON_FORMS for w in words):
                return None  # a main verb follows: "a man with a hat sits" would read "a man that has a hat sits"
            return tokens[:j] + ["that", "have" if _plural(words[:j]) else "has"] + tokens[j + 1:]
    return None


def passive_rule(tokens: Tokens) -> Tokens | None:
    """'A man is holding an umbrella in the rain' -> 'An umbrella is being held by a man in the rain'."""
    words = _lower(tokens)
    for j in range(1, min(len(words) - 2, 10)):
        forms = VERB_FORMS.get(words[j])
        if forms is None or words[j] == forms[0] or not _verb_at(words, j):
            continue
        if forms[0] not in TRANSITIVE:
            return None  # the first verb is the main one; later verbs sit in modifiers
        has_aux = words[j - 1] in ("is", "are")
        subject_end = j - 1 if has_aux else j
        if not _clean_subject(words[:subject_end]):
            return None
        object_end = _noun_phrase_end(words, j + 1)
        if object_end == j + 1:  # a bare plural object: "is wearing sunglasses"
            object_end = j + 1
            while object_end < len(words) and object_end - j <= 3 and not _stopper(words[object_end]) \
                    and words[object_end] not in DETERMINERS:
                object_end += 1
            if object_end == j + 1 or not _plural(words[j + 1:object_end]):
                return None
        rest = tokens[object_end:]
        rest_words = words[object_end:]
        if rest_words and _is_word(rest_words[0]) and (rest_words[0] not in PREPOSITIONS or rest_words[0] in
                                                        ("while", "as", "like", "and", "of", "to", "up", "down")):
            return None
        if rest_words and not _is_word(rest_words[0]) and rest_words[0] not in ".!":
            return None
        obj = tokens[j + 1:object_end]
        be = "are" if _plural(words[j + 1:object_end]) else "is"
        participle = _match_case(tokens[j], forms[3])
        subject = _lower_first(tokens[:subject_end])
        if words[j] in ING_FORMS and has_aux:
            middle = [be, "being", participle, "by"]
        elif words[j] in ING_FORMS:
            middle = [participle, "by"]
        else:
            middle = [be, participle, "by"]
        return obj + middle + subject + rest
    return None


def _bare_phrase_end(words: list[str], start: int) -> int:
    """End of a noun phrase without determiner ("white shorts", "plates of food"); `start` when none."""
    end = start
    while end < len(words) and end - start < 6 and not _stopper(words[end]) and words[end] not in DETERMINERS \
            and not (_plain_verb_at(words, end) and _plural(words[start:end])):
        end += 1
    if end > start and end + 1 < len(words) and words[end] == "of" and not _stopper(words[end + 1]):
        end = _bare_phrase_end(words, end + 1) if words[end + 1] not in DETERMINERS else \
            _noun_phrase_end(words, end + 1, allow_of=False)
    return end


def coordination_rule(tokens: Tokens) -> Tokens | None:
    """'a fork and a knife on a plate' -> 'a knife and a fork on a plate'; 'in black shirt and white shorts'
    -> 'in white shorts and black shirt'."""
    words = _lower(tokens)
    for k in range(1, len(words) - 1):
        if words[k] != "and":
            continue
        right_end = _noun_phrase_end(words, k + 1)
        if right_end == k + 1:
            right_end = _bare_phrase_end(words, k + 1)
        if right_end > k + 2 and _plain_verb_at(words, right_end - 1):
            right_end -= 1  # "two monitors and a laptop sit on ...": the coordination is the plural subject
        if right_end == k + 1:
            continue
        left_start = None
        for d in range(k - 1, max(-1, k - 8), -1):
            if words[d] in DETERMINERS and _noun_phrase_end(words, d) == k:
                left_start = d
                break
            if d > 0 and words[d - 1] in PREPOSITIONS and words[d - 1] != "of" and _bare_phrase_end(words, d) == k:
                left_start = d
                break
            if _stopper(words[d]) and words[d] != "of":
                break
        if left_start is None or (left_start > 0 and words[left_start - 1] == ","):
            continue
        left, right = tokens[left_start:k], tokens[k + 1:right_end]
        left_words, right_words = _lower(left), _lower(right)
        if "other" in left_words + right_words or left_words == right_words or left_words[-1] in ATTRIBUTE_WORDS \
                or right_words[-1] in ATTRIBUTE_WORDS or (right_end < len(words) and _is_word(words[right_end])
                                                           and not _stopper(words[right_end])
                                                           and not _plain_verb_at(words, right_end)):
            continue  # "black and white cat": adjectives share the noun, swapping them would detach it
        if left_start == 0:
            left = _lower_first(left)
        return tokens[:left_start] + right + [tokens[k]] + left + tokens[right_end:]
    return None


def _phrase_matches(words: list[str], lexicon: dict[str, str]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, replacement) matches of the lexicon's phrases, longest first; protected
    compounds are skipped whole."""
    longest = max(len(p.split()) for p in lexicon)
    matches = []
    i = 0
    while i < len(words):
        protected = next((len(p) for p in _PROTECTED_BY_FIRST.get(words[i], ()) if tuple(words[i:i + len(p)]) == p
                          and " ".join(p) not in lexicon), 0)
        if protected:
            i += protected
            continue
        for n in range(min(longest, len(words) - i), 0, -1):
            phrase = " ".join(words[i:i + n])
            if phrase in lexicon:
                matches.append((i, i + n, lexicon[phrase]))
                i += n
                break
        else:
            i += 1
    return matches


def _replace(tokens: Tokens, start: int, end: int, replacement: str) -> Tokens:
    new = replacement.split()
    new[0] = _match_case(tokens[start], new[0])
    if len(tokens[start]) > 3 and tokens[start].isupper():
        new = [w.upper() for w in new]
    out = tokens[:start] + new + tokens[end:]
    if start > 0 and _lower(tokens[start - 1:start]) == ["a"] and new[0][:1].lower() in "aeiou":
        out[start - 1] = _match_case(tokens[start - 1], "an")
    elif start > 0 and _lower(tokens[start - 1:start]) == ["an"] and new[0][:1].lower() not in "aeiou":
        out[start - 1] = _match_case(tokens[start - 1], "a")
    return out


def synonym_rule(tokens: Tokens) -> Tokens | None:
    """Every lexicon synonym at once: 'A picture of a cat next to a couch' -> 'A photo of a cat beside a sofa'."""
    out = tokens
    for start, end, replacement in reversed(_phrase_matches(_lower(tokens), SYNONYMS)):
        if start > 0 and tokens[start][:1].isupper() and not tokens[start].isupper():
            continue  # a capitalized word inside the sentence is a name
        out = _replace(out, start, end, replacement)
    return out if out is not tokens else None


PARAPHRASE_RULES: list[tuple[str, Callable[[Tokens], Tokens | None]]] = [
    ("there", there_rule), ("relative", relative_rule), ("passive", passive_rule),
    ("coordination", coordination_rule), ("with", with_rule),
]


FRAMED = {"picture", "photo", "image", "photograph", "view", "shot", "close", "close-up", "this", "there", "here"}


def frame_rule(tokens: Tokens) -> Tokens | None:
    """The last resort: 'A cat is way up in a tree' -> 'In this picture, a cat is way up in a tree'. A caption
    describes its picture, so the frame adds nothing; skipped when the caption already frames itself."""
    words = _lower(tokens)
    if any(w in FRAMED for w in words[:3]):
        return None
    return ["In", "this", "picture", ","] + _lower_first(tokens)


def paraphrase_candidates(caption: str) -> list[tuple[str, str]]:
    """(rule name, text) candidates, most reworded first: each structural rewrite with synonyms, then
    without, then synonyms alone, then the frame."""
    tokens = tokenize(caption)
    if not tokens:
        return []
    structural = [(name, out) for name, rule in PARAPHRASE_RULES if (out := rule(tokens)) is not None]
    combined = [(name + "+synonyms", syn) for name, out in structural if (syn := synonym_rule(out)) is not None]
    alone = [("synonyms", out)] if (out := synonym_rule(tokens)) is not None else []
    framed = [("frame", out)] if (out := frame_rule(tokens)) is not None else []
    return [(name, finish(out, caption)) for name, out in combined + structural + alone + framed]


# ----------------------------------------------------------------------------- negation rules


def swap_edits(tokens: Tokens) -> list[Tokens]:
    """Two attributes bound to different nouns, or two different objects, trade places."""
    words = _lower(tokens)
    edits = []
    bound = [i for i in range(len(words) - 1) if words[i] in ATTRIBUTE_WORDS and _is_word(words[i + 1])
             and not _stopper(words[i + 1]) and words[i + 1] not in ATTRIBUTE_WORDS]
    for a in range(len(bound)):
        for b in range(a + 1, len(bound)):
            i, j = bound[a], bound[b]
            if words[i] != words[j] and words[i + 1] != words[j + 1]:
                out = _replace(tokens, j, j + 1, words[i])  # right one first: the left's index stays valid
                edits.append(_replace(out, i, i + 1, words[j]))
    objects = [(s, e) for s, e, _ in _phrase_matches(words, OBJECTS)
               if (e == len(words) or _stopper(words[e])) and (e == len(words) or words[e] != "of")
               and s > 0 and (words[s - 1] in DETERMINERS or words[s - 1] in ATTRIBUTE_WORDS or words[s - 1] == "of")
               and " ".join(words[s:e]) not in UNCOUNTABLE]
    for a in range(len(objects)):
        for b in range(a + 1, len(objects)):
            (s1, e1), (s2, e2) = objects[a], objects[b]
            first, second = " ".join(words[s1:e1]), " ".join(words[s2:e2])
            if first != second and (first in SINGULAR_OBJECTS) == (second in SINGULAR_OBJECTS):
                out = tokens[:s1] + _replace(tokens, s1, e1, second)[s1:s1 + len(second.split())] \
                    + tokens[e1:s2] + _replace(tokens, s2, e2, first)[s2:s2 + len(first.split())] + tokens[e2:]
                edits.append(out)
    return edits


def _substitution_edits(tokens: Tokens, lexicon: dict[str, str]) -> list[Tokens]:
    """One edit per lexicon match, skipping replacements the caption already mentions (still true then)."""
    words = _lower(tokens)
    present = " " + " ".join(words) + " "
    edits = []
    for start, end, replacement in _phrase_matches(words, lexicon):
        if f" {replacement} " in present:
            continue
        if words[start] == "with" and start > 0 and (words[start - 1].endswith("ed") or words[start - 1] in
                                                      ("along", "playing", "together", "up")):
            continue
        if words[start] in POSTURES and not any(w in ANIMATE for w in words[:start]):
            continue
        if words[start] in MOTION_VERBS and start + 1 < len(words) and words[start + 1] in DETERMINERS:
            continue
        edits.append(_replace(tokens, start, end, replacement))
    return edits


def attribute_edits(tokens: Tokens) -> list[Tokens]:
    return _substitution_edits(tokens, OPPOSITE_ATTRIBUTES)


def relation_edits(tokens: Tokens) -> list[Tokens]:
    return _substitution_edits(tokens, RELATIONS)


def object_edits(tokens: Tokens) -> list[Tokens]:
    return _substitution_edits(tokens, OBJECTS)


def negate_edits(tokens: Tokens) -> list[Tokens]:
    """Insert or remove one negation."""
    words = _lower(tokens)
    edits = []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word in ("is", "are") and following == "not":
            edits.append(tokens[:i + 1] + tokens[i + 2:])
        elif word in ("is", "are") and i == 1 and words[0] == "there" and following in DETERMINERS - {"the"}:
            edits.append(tokens[:i + 1] + [_match_case(tokens[i + 1], "no")] + tokens[i + 2:])
        elif word in ("is", "are") and i > 0 and following and following not in ("no", "not", "of"):
            edits.append(tokens[:i + 1] + [_match_case(tokens[i], "not")] + tokens[i + 1:])
        elif word == "without":
            edits.append(tokens[:i] + [_match_case(tokens[i], "with")] + tokens[i + 1:])
        elif word == "no" and i > 0 and following and _is_word(following):
            edits.append(tokens[:i] + [_match_case(tokens[i], "some")] + tokens[i + 1:])
        elif word in THIRD_PERSON_FORMS and _verb_at(words, i) and not _plural(words[:i]) and _clean_subject(words[:i]):
            base = VERB_FORMS[word][0]
            edits.append(tokens[:i] + [_match_case(tokens[i], "does"), "not", base] + tokens[i + 1:])
        elif word in ING_FORMS and _verb_at(words, i) and _clean_subject(words[:i]) and not any(
                w in ("is", "are") or w in THIRD_PERSON_FORMS for w in words):
            edits.append(tokens[:i] + [_match_case(tokens[i], "not")] + [tokens[i].lower()] + tokens[i + 1:])
        if len(edits) == 1:
            break
    return edits


NEGATION_RULES: list[tuple[str, Callable[[Tokens], list[Tokens]]]] = [
    ("swap", swap_edits), ("attribute", attribute_edits), ("relation", relation_edits),
    ("object", object_edits), ("negate", negate_edits),
]


def negation_candidates(caption: str) -> list[tuple[str, str]]:
    """(rule name, text) candidates: the families' first edits in a caption-dependent rotation, then their
    second edits, and so on."""
    tokens = tokenize(caption)
    if not tokens:
        return []
    offset = int(hashlib.sha1(caption.strip().lower().encode("utf-8")).hexdigest(), 16) % len(NEGATION_RULES)
    rules = NEGATION_RULES[offset:] + NEGATION_RULES[:offset]
    per_rule = [(name, rule(tokens)) for name, rule in rules]
    out = []
    for depth in range(max((len(edits) for _, edits in per_rule), default=0)):
        out += [(name, finish(edits[depth], caption)) for name, edits in per_rule if depth < len(edits)]
    return out


# ----------------------------------------------------------------------------- the generator


class RulesGenerator:
    """Deterministic: the same caption and counts always give the same texts."""

    name = "rules"

    def generate(self, caption: str, paraphrases: int, negations: int) -> tuple[list[str], list[str], str | None]:
        """(paraphrases, negations, None), or (partial lists, ..., reason) when the rules find too few."""
        para_candidates = [text for _, text in paraphrase_candidates(caption)]
        chosen_p, _ = select_texts(caption, para_candidates, paraphrases)
        neg_candidates = [text for _, text in negation_candidates(caption)]
        chosen_n, _ = select_texts(caption, neg_candidates, negations, avoid=tuple(chosen_p))
        missing = []
        if len(chosen_p) < paraphrases:
            missing.append(f"{len(chosen_p)} of {paraphrases} paraphrase(s)")
        if len(chosen_n) < negations:
            missing.append(f"{len(chosen_n)} of {negations} negation(s)")
        return chosen_p, chosen_n, ("rules found only " + " and ".join(missing)) if missing else None
