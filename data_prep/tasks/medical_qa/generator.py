"""Seeded synthetic medical QA from a small textbook fact bank: varied question phrasings and vignettes, free-text
answers, and multiple-choice items whose distractors come from the same kind of fact."""

from __future__ import annotations

import random

# kind → (question templates with {subject}, answer sentence templates with {answer}/{subject}, facts).
KINDS: dict[str, tuple[list[str], list[str], list[tuple[str, str]]]] = {
    "treatment": (
        ["What is the first-line treatment for {subject}?", "Which treatment should be given first in {subject}?",
         "A {age}-year-old {sex} presents with {subject}. What is the first-line management?",
         "In {subject}, what do current guidelines recommend first?"],
        ["The first-line treatment is {answer}.", "Give {answer} first.", "{answer_cap} is recommended first-line."],
        [("anaphylaxis", "intramuscular adrenaline"), ("uncomplicated lower urinary tract infection", "nitrofurantoin"),
         ("newly diagnosed type 2 diabetes", "metformin"), ("paracetamol overdose", "acetylcysteine"),
         ("opioid overdose with respiratory depression", "naloxone"),
         ("hyperkalaemia with ECG changes", "intravenous calcium gluconate"),
         ("hypoglycaemia in a conscious patient", "oral glucose"), ("status epilepticus",
                                                                    "a benzodiazepine such as lorazepam"),
         ("Parkinson's disease with disabling motor symptoms", "levodopa"),
         ("mild community-acquired pneumonia in an adult", "amoxicillin")],
    ),
    "deficiency": (
        ["Deficiency of which vitamin causes {subject}?", "{subject_cap} results from a lack of which vitamin?",
         "A {age}-year-old {sex} is diagnosed with {subject}. Which vitamin is deficient?"],
        ["{subject_cap} is caused by {answer} deficiency.", "It is due to a lack of {answer}.",
         "{answer_cap} deficiency."],
        [("scurvy", "vitamin C"), ("beriberi", "vitamin B1 (thiamine)"), ("rickets", "vitamin D"),
         ("pellagra", "vitamin B3 (niacin)"), ("pernicious anaemia", "vitamin B12"),
         ("night blindness", "vitamin A")],
    ),
    "organism": (
        ["Which organism causes {subject}?", "What is the causative agent of {subject}?",
         "A {age}-year-old {sex} is diagnosed with {subject}. Which pathogen is responsible?"],
        ["{subject_cap} is caused by {answer}.", "The causative organism is {answer}.", "{answer_cap}."],
        [("tuberculosis", "Mycobacterium tuberculosis"), ("Lyme disease", "Borrelia burgdorferi"),
         ("syphilis", "Treponema pallidum"), ("cholera", "Vibrio cholerae"), ("tetanus", "Clostridium tetani"),
         ("falciparum malaria", "Plasmodium falciparum"), ("whooping cough", "Bordetella pertussis")],
    ),
    "drug_class": (
        ["To which drug class does {subject} belong?", "What kind of drug is {subject}?",
         "A {age}-year-old {sex} is started on {subject}. What is its drug class?"],
        ["{subject_cap} is {answer}.", "It belongs to the class of {answer}s.", "{answer_cap}."],
        [("metoprolol", "a beta blocker"), ("lisinopril", "an ACE inhibitor"), ("atorvastatin", "a statin"),
         ("omeprazole", "a proton pump inhibitor"), ("sertraline", "a selective serotonin reuptake inhibitor"),
         ("furosemide", "a loop diuretic"), ("amlodipine", "a calcium channel blocker"),
         ("warfarin", "a vitamin K antagonist")],
    ),
}
LETTERS = "ABCDE"
SEXES = ["man", "woman"]


def generate_items(n: int, seed: int, options: int = 4) -> list[dict]:
    """Records with both forms: `question`/`answer` (free text) and `stem`/`options`/`answer_letter` (MC)."""
    rng = random.Random(seed)
    kinds = sorted(KINDS)
    items = []
    for index in range(n):
        kind = rng.choice(kinds)
        questions, answers, facts = KINDS[kind]
        subject, answer = rng.choice(facts)
        slots = {"subject": subject, "subject_cap": _cap(subject), "answer": answer, "answer_cap": _cap(answer),
                 "age": rng.randint(18, 85), "sex": rng.choice(SEXES)}
        question = rng.choice(questions).format(**slots)
        choices = [answer, *rng.sample([a for s, a in facts if a != answer], k=options - 1)]
        rng.shuffle(choices)
        items.append({
            "id": f"MQ{seed}-{index:05d}", "kind": kind, "question": question,
            "answer": rng.choice(answers).format(**slots),
            "options": choices, "answer_letter": LETTERS[choices.index(answer)],
        })
    return items


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def reference_passages() -> dict[str, list[str]]:
    """The fact bank as textbook passages, one list per kind: documents for retrieval-augmented evaluation."""
    passages = {}
    for kind, (_, answers, facts) in sorted(KINDS.items()):
        passages[kind] = [f"{_cap(subject)}. " + answers[0].format(subject=subject, subject_cap=_cap(subject),
                                                                     answer=answer, answer_cap=_cap(answer))
                          for subject, answer in facts]
    return passages
