"""The example task's reward: one short sentence of an answer, then a follow-up question.

score(prompts, responses) -> list[float]: one number per response, higher is better (here in [0, 1]).
"""


def score(prompts: list[str], responses: list[str]) -> list[float]:
    scores = []
    for response in responses:
        text = response.strip()
        words = len(text.split())
        points = 0.0
        if text.endswith("?"):
            points += 0.5  # ends by asking the user something
        if 0 < words <= 25:
            points += 0.3  # short
        if text.count("?") == 1:
            points += 0.2  # exactly one question
        scores.append(points)
    return scores
