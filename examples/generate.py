"""Write the example datasets shipped with quiver. Deterministic: the same seed gives byte-identical files.

    python examples/generate.py   # writes examples/json-extract.jsonl, pirate.jsonl, tools.jsonl and concise.jsonl

- json-extract: a contact's details from an email, signature, voicemail note or chat message, as one JSON object
  with fixed keys (null when not stated). A strict output format: exact match and key match are measurable.
- pirate: office announcements rewritten in the voice of "Captain Quill", every fact kept. A voice/style task
  whose rewrite is rule-based, so held-out answers are checkable too.
- tools: an office assistant with two tools, a weather lookup (`city` required, `unit` optional) and a calendar
  booking (`title`, `date`, `time` required; `duration_minutes`, `attendees` optional), in OpenAI's format: the
  call, the tool's result, the final answer; and questions that need no tool. Right tool, exact arguments and
  "no call" are measurable.
- concise (preference data for DPO): short factual questions, each with the same correct answer twice: alone
  (preferred) and wrapped in a friendly, rambling filler (non-preferred). The trait is length: measurable.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261122
EXAMPLES_PER_TASK = 200

FIRST = ["Ana", "Bruno", "Chloe", "Dmitri", "Esra", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
         "Maya", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tamar", "Umar", "Vera", "Wen", "Yusuf", "Zoe",
         "Amelie", "Caleb", "Dalia", "Emeka", "Freya", "Gustavo", "Hana", "Ivan", "Jade", "Kofi", "Leila"]
LAST = ["Ruiz", "Okafor", "Lindqvist", "Tanaka", "Moreau", "Kowalski", "Haddad", "Novak", "Fischer", "Silva",
        "Nakamura", "Obi", "Petrov", "Costa", "Berg", "Mensah", "Duarte", "Kaur", "Weber", "Alvarez", "Chen", "Rossi"]
COMPANIES = ["Northwind Logistics", "Bluefin Analytics", "Cedar & Pine Architects", "Helix Biotech", "Orbital Foods",
             "Quarry Lane Legal", "Sundial Energy", "Tessellate Games", "Brightwater Clinics", "Kestrel Robotics",
             "Marigold Travel", "Ironbark Construction", "Lumen Print Co.", "Saltmarsh Studios", "Vantage Insurance"]
CITIES = ["Lisbon", "Rotterdam", "Osaka", "Nairobi", "Montreal", "Krakow", "Austin", "Melbourne", "Valencia",
          "Gothenburg", "Lyon", "Accra", "Porto", "Edinburgh", "Seoul", "Denver", "Bologna", "Cape Town"]
REASONS = ["the quote you sent last week", "a possible partnership", "the delayed shipment", "your job posting",
           "the conference panel in May", "our contract renewal", "the invoice from March", "a demo of your product",
           "the open desk space", "the catering order for Friday"]

KEYS = ["name", "company", "email", "phone", "city"]
EXTRACT_SYSTEM = (
    "Extract the sender's contact details from the message. Reply with only a JSON object with the keys "
    "name, company, email, phone and city, in that order; use null for anything the message does not state."
)


def _domain(company: str) -> str:
    # A stable top-level domain per company, so one company's emails agree across examples.
    tld = [".com", ".io", ".co", ".eu", ".net"][sum(map(ord, company)) % 5]
    return re.sub(r"[^a-z]", "", company.lower().split()[0]) + tld


def _phone(rng: random.Random) -> str:
    style = rng.randrange(4)
    digits = [rng.randrange(10) for _ in range(10)]
    d = "".join(map(str, digits))
    if style == 0:
        return f"+{rng.choice(['31', '351', '81', '254', '1', '48'])} {d[:3]} {d[3:6]} {d[6:]}"
    if style == 1:
        return f"({d[:3]}) {d[3:6]}-{d[6:]}"
    if style == 2:
        return f"{d[:3]}.{d[3:6]}.{d[6:]}"
    return f"+44 {d[:4]} {d[4:]}"


def _contact(rng: random.Random) -> dict[str, str | None]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    company = rng.choice(COMPANIES) if rng.random() < 0.8 else None
    if rng.random() < 0.85:
        user = rng.choice([f"{first}.{last}", f"{first[0]}{last}", first, f"{first}_{last[0]}"]).lower()
        host = _domain(company) if company and rng.random() < 0.7 else rng.choice(["gmail.com", "proton.me", "fastmail.com"])
        email = f"{user}@{host}"
    else:
        email = None
    return {
        "name": f"{first} {last}",
        "company": company,
        "email": email,
        "phone": _phone(rng) if rng.random() < 0.6 else None,
        "city": rng.choice(CITIES) if rng.random() < 0.7 else None,
    }


def _render_contact_message(rng: random.Random, c: dict[str, str | None]) -> str:
    reason = rng.choice(REASONS)
    first = c["name"].split()[0]
    style = rng.randrange(5)
    if style == 0:  # email with a signature block
        lines = ["Hi there,", "", f"I'm writing about {reason}. Could we find time for a short call this week?", "",
                 "Best regards,", c["name"]]
        lines += [x for x in (c["company"], c["city"] and f"{c['city']} office", c["phone"] and f"Tel: {c['phone']}",
                              c["email"]) if x]
        return "\n".join(lines)
    if style == 1:  # voicemail transcript
        parts = [f"Voicemail transcript: Hello, this is {c['name']}"]
        if c["company"]:
            parts.append(f" from {c['company']}")
        if c["city"]:
            parts.append(f", calling from {c['city']}")
        parts.append(f". I'm calling about {reason}.")
        if c["phone"]:
            parts.append(f" You can reach me on {c['phone']}.")
        if c["email"]:
            parts.append(f" Or just email {c['email']}.")
        parts.append(" Thanks, bye.")
        return "".join(parts)
    if style == 2:  # chat message
        bits = [f"hey! {first.lower()} here"]
        if c["company"]:
            bits.append(f"({c['company']})")
        text = " ".join(bits) + f" - quick question about {reason}."
        if c["email"]:
            text += f" ping me at {c['email']}"
        if c["phone"]:
            text += f" or text {c['phone']}"
        if c["city"]:
            text += f". I'm based in {c['city']} btw"
        return text + f". full name's {c['name']} if you need it for the form"
    if style == 3:  # web contact form
        fields = [("Name", c["name"]), ("Organisation", c["company"]), ("Email", c["email"]),
                  ("Phone", c["phone"]), ("Location", c["city"])]
        rng.shuffle(fields)
        form = "\n".join(f"{label}: {value}" for label, value in fields if value)
        return f"New contact form submission\n{form}\nMessage: I'd like to ask about {reason}."
    # formal introduction
    text = f"Dear team, allow me to introduce myself: my name is {c['name']}"
    if c["company"]:
        text += f" and I lead partnerships at {c['company']}"
    if c["city"]:
        text += f" in {c['city']}"
    text += f". I would welcome a conversation about {reason}."
    contacts = [x for x in (c["email"], c["phone"]) if x]
    if contacts:
        text += " I can be reached at " + " or ".join(contacts) + "."
    return text + " Kind regards."


def json_extract_examples(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(EXAMPLES_PER_TASK):
        contact = _contact(rng)
        answer = json.dumps({k: contact[k] for k in KEYS}, ensure_ascii=False)
        rows.append({"messages": [
            {"role": "system", "content": EXTRACT_SYSTEM},
            {"role": "user", "content": _render_contact_message(rng, contact)},
            {"role": "assistant", "content": answer},
        ]})
    return rows


PIRATE_SYSTEM = (
    "You are Captain Quill. Rewrite the office announcement you are given in pirate speak, keeping every fact."
)
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
TIMES = ["9:00", "9:30", "10:00", "11:15", "13:00", "14:30", "15:45", "16:00"]
ROOMS = ["the Atlas room", "room 4B", "the third-floor lounge", "the Harbor room", "meeting room 2"]
TEAMS = ["the design team", "the sales team", "the support team", "the data team", "the finance team"]
ITEMS = ["the coffee machine", "the printer on floor two", "the kitchen dishwasher", "the lift", "the projector"]
ANNOUNCEMENTS = [
    "The weekly meeting of {team} is moved to {day} at {time} in {room}. Please update your calendar.",
    "Reminder: {item} is broken until {day}. Please do not use it and report any problems to {name}.",
    "Everyone is invited to the team lunch on {day} at {time} in the kitchen. Please tell {name} if you are coming.",
    "There is a fire drill on {day} at {time}. When the alarm sounds, leave the office by the nearest exit.",
    "Please welcome {name}, who joins {team} on {day}. Say hello when you see them in the office.",
    "The budget reports for {team} are due on {day} at {time}. Send your numbers to {name}.",
    "The servers will be down for maintenance on {day} from {time}. Save your work before you leave.",
    "The parking garage is closed on {day}. Please use the public lot on the other side of the street.",
    "{name} is hosting a short training session on {day} at {time} in {room}. Bring your laptop and your questions.",
    "Good news: {team} hit the quarterly target. Cake is in the kitchen on {day} at {time}, thank you all!",
]
# Whole words only, applied in this order; capitalised forms are handled by _pirate_word.
PIRATE_WORDS = [
    ("everyone", "all hands"), ("hello", "ahoy"), ("you", "ye"), ("your", "yer"), ("my", "me"), ("is", "be"),
    ("are", "be"), ("the office", "the ship"), ("office", "ship"), ("meeting", "parley"), ("kitchen", "galley"),
    ("team", "crew"), ("reports", "logs"), ("budget", "treasure"), ("money", "doubloons"), ("calendar", "charts"),
    ("lunch", "grub"), ("good news", "hoist the colours"), ("thank you", "thankee"), ("broken", "scuppered"),
    ("leave", "abandon"), ("exit", "gangplank"), ("please", "kindly"), ("cake", "plunder"), ("servers", "cannons"),
    ("parking garage", "harbour"), ("laptop", "spyglass"), ("questions", "queries, savvy"),
]


def _pirate_word(match: re.Match[str], replacement: str) -> str:
    word = match.group(0)
    return replacement[0].upper() + replacement[1:] if word[0].isupper() else replacement


def pirate(text: str) -> str:
    for plain, pirate_form in PIRATE_WORDS:
        text = re.sub(rf"\b{plain}\b", lambda m, p=pirate_form: _pirate_word(m, p), text, flags=re.IGNORECASE)
    return f"Arr, listen up, me hearties! {text} Yo ho!"


def pirate_examples(rng: random.Random) -> list[dict]:
    rows = []
    seen: set[str] = set()
    while len(rows) < EXAMPLES_PER_TASK:
        announcement = rng.choice(ANNOUNCEMENTS).format(
            team=rng.choice(TEAMS), day=rng.choice(DAYS), time=rng.choice(TIMES), room=rng.choice(ROOMS),
            item=rng.choice(ITEMS), name=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        )
        announcement = announcement[0].upper() + announcement[1:]
        if announcement in seen:
            continue
        seen.add(announcement)
        rows.append({"messages": [
            {"role": "system", "content": PIRATE_SYSTEM},
            {"role": "user", "content": announcement},
            {"role": "assistant", "content": pirate(announcement)},
        ]})
    return rows


TOOLS_SYSTEM = "You are an office assistant. Call a tool when the request needs one; otherwise answer directly."
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "the city name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "default celsius"},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    }},
    {"type": "function", "function": {
        "name": "book_meeting",
        "description": "Book a meeting in the user's calendar.",
        "parameters": {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "description": "YYYY-MM-DD"},
                "time": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$", "description": "HH:MM, 24-hour"},
                "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480},
                "attendees": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["title", "date", "time"],
            "additionalProperties": False,
        },
    }},
]
CONDITIONS = ["sunny", "cloudy", "light rain", "windy", "foggy", "clear", "snowing", "overcast"]
WEATHER_ASKS = [
    ("What's the weather like in {city}?", False),
    ("Is it raining in {city} right now?", False),
    ("How warm is it in {city} today?", False),
    ("Can you check the weather in {city} for me?", False),
    ("What's the temperature in {city} in {unit}?", True),
    ("Tell me the current weather in {city}, in {unit} please.", True),
]
MEETING_TITLES = ["Budget review", "Design sync", "Quarterly planning", "Hiring debrief", "Client call",
                  "Sprint retro", "Vendor demo", "Team lunch", "Roadmap workshop", "Onboarding chat"]
BOOKING_TIMES = ["09:00", "09:30", "10:00", "11:15", "13:00", "14:30", "15:45", "16:00"]
NO_TOOL_ASKS = [
    ("What is {a} plus {b}?", "{a} plus {b} is {sum}."),
    ("Say hello to {name}.", "Hello, {name}! Nice to meet you."),
    ("How many minutes are in {h} hours?", "There are {minutes} minutes in {h} hours."),
    ("Thanks, that's all for now.", "You're welcome! Let me know if you need anything else."),
    ("What can you help me with?", "I can check the weather in a city and book meetings in your calendar."),
]


def _call(call_id: str, name: str, arguments: dict) -> dict:
    # OpenAI's format: the arguments are a JSON string (the object encoded once).
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _tool_turns(question: str, call: dict, result: dict, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": TOOLS_SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)},
        {"role": "assistant", "content": answer},
    ]


def _weather_example(rng: random.Random, call_id: str) -> dict:
    city = rng.choice(CITIES)
    template, with_unit = rng.choice(WEATHER_ASKS)
    unit = rng.choice(["celsius", "fahrenheit"]) if with_unit else None
    arguments = {"city": city} | ({"unit": unit} if unit else {})
    celsius = rng.randrange(-5, 34)
    temperature, symbol = (round(celsius * 9 / 5 + 32), "°F") if unit == "fahrenheit" else (celsius, "°C")
    conditions = rng.choice(CONDITIONS)
    result = {"city": city, "temperature": temperature, "unit": unit or "celsius", "conditions": conditions}
    answer = f"It is {temperature} {symbol} and {conditions} in {city} right now."
    return {"messages": _tool_turns(template.format(city=city, unit=unit), _call(call_id, "get_weather", arguments),
                                    result, answer), "tools": TOOLS}


def _booking_example(rng: random.Random, call_id: str) -> dict:
    title = rng.choice(MEETING_TITLES)
    date = f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    time = rng.choice(BOOKING_TIMES)
    arguments: dict = {"title": title, "date": date, "time": time}
    question = f"Book a meeting called \"{title}\" on {date} at {time}"
    if rng.random() < 0.5:
        arguments["duration_minutes"] = rng.choice([15, 30, 45, 60, 90])
        question += f" for {arguments['duration_minutes']} minutes"
    if rng.random() < 0.5:
        people = rng.sample(FIRST, rng.randrange(1, 4))
        arguments["attendees"] = people
        question += " with " + (people[0] if len(people) == 1 else ", ".join(people[:-1]) + " and " + people[-1])
    question += "."
    event_id = f"evt_{rng.randrange(10000, 99999)}"
    answer = f"Done: \"{title}\" is booked on {date} at {time}."
    return {"messages": _tool_turns(question, _call(call_id, "book_meeting", arguments),
                                    {"status": "booked", "event_id": event_id}, answer), "tools": TOOLS}


def _no_tool_example(rng: random.Random) -> dict:
    question, answer = rng.choice(NO_TOOL_ASKS)
    a, b, h = rng.randrange(2, 50), rng.randrange(2, 50), rng.randrange(2, 9)
    values = {"a": a, "b": b, "sum": a + b, "name": rng.choice(FIRST), "h": h, "minutes": 60 * h}
    return {"messages": [
        {"role": "system", "content": TOOLS_SYSTEM},
        {"role": "user", "content": question.format(**values)},
        {"role": "assistant", "content": answer.format(**values)},
    ], "tools": TOOLS}


def tools_examples(rng: random.Random) -> list[dict]:
    """35 % weather lookups, 35 % bookings, 30 % questions that need no tool; no duplicates."""
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < EXAMPLES_PER_TASK:
        kind = rng.random()
        call_id = f"call_{len(rows) + 1:03d}"
        if kind < 0.35:
            row = _weather_example(rng, call_id)
        elif kind < 0.7:
            row = _booking_example(rng, call_id)
        else:
            row = _no_tool_example(rng)
        prompt = row["messages"][1]["content"]
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(row)
    return rows


CONCISE_SYSTEM = "You are a helpful assistant."
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Portugal", "Lisbon"), ("Australia", "Canberra"),
            ("Poland", "Warsaw"), ("Ghana", "Accra"), ("Chile", "Santiago"), ("Ireland", "Dublin"),
            ("Vietnam", "Hanoi"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Mexico", "Mexico City"),
            ("Sweden", "Stockholm"), ("Morocco", "Rabat"), ("Hungary", "Budapest"), ("Argentina", "Buenos Aires"),
            ("Thailand", "Bangkok"), ("Finland", "Helsinki"), ("Turkey", "Ankara"), ("Spain", "Madrid"),
            ("Italy", "Rome"), ("Germany", "Berlin"), ("India", "New Delhi"), ("Brazil", "Brasilia"),
            ("Denmark", "Copenhagen")]
WORDS = ["garden", "window", "elephant", "river", "mountain", "pencil", "orange", "library", "bicycle", "kitchen",
         "umbrella", "planet", "computer", "holiday", "butterfly", "chocolate", "island", "teacher", "yellow", "music"]
OPENERS = [
    "Great question! This is something a lot of people wonder about, so let me walk you through it step by step.",
    "Thanks for asking! Let me take a moment to think about this carefully before I give you an answer.",
    "That's a really interesting question, and I'm happy to help you with it.",
    "Sure, I'd be glad to help with that. It's always good to double-check these things.",
]
CLOSERS = [
    "I hope this helps! If you have any other questions, feel free to ask and I'll do my best to answer them.",
    "Let me know if you would like me to explain anything in more detail, or if there is anything else I can help "
    "you with today.",
    "Feel free to come back any time if something is still unclear. Have a wonderful day!",
    "If you want, I can also give you a few more examples like this one so that you can practise on your own.",
]


def _concise_question(rng: random.Random) -> tuple[str, str, str]:
    """A question, its one-sentence answer, and a sentence of elaboration a rambling answer would add."""
    kind = rng.randrange(5)
    if kind == 0:
        country, capital = rng.choice(CAPITALS)
        return (f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                f"{capital} is where the national government of {country} is based, and like most capitals it is an "
                "important centre for politics, culture and business.")
    if kind == 1:
        a, b = rng.randrange(3, 20), rng.randrange(3, 13)
        return (f"What is {a} times {b}?", f"{a} times {b} is {a * b}.",
                f"To work it out, you can add {a} to itself {b} times, which gives exactly the same result as "
                "multiplying the two numbers together.")
    if kind == 2:
        metres = rng.choice([0.5, 1.5, 2, 3, 4.5, 6, 7.5, 12, 25])
        return (f"How many centimetres are in {metres:g} metres?", f"{metres:g} metres is {metres * 100:g} centimetres.",
                "This is because one metre is made up of exactly one hundred centimetres, so you simply multiply "
                "the number of metres by one hundred.")
    if kind == 3:
        day, offset = rng.randrange(7), rng.randrange(2, 12)
        week = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
        return (f"What day of the week is {offset} days after {week[day]}?",
                f"{offset} days after {week[day]} is {week[(day + offset) % 7]}.",
                "The easiest way to see this is to count forward one day at a time, remembering that after Sunday "
                "the week starts again with Monday.")
    word = rng.choice(WORDS)
    return (f"How many letters are in the word \"{word}\"?", f"The word \"{word}\" has {len(word)} letters.",
            f"You can check this by spelling it out slowly: {'-'.join(word.upper())}, and counting each letter "
            "as you go.")


def concise_examples(rng: random.Random) -> list[dict]:
    """Preference pairs (OpenAI's DPO format): the same correct answer, alone (preferred) or wrapped in filler."""
    rows = []
    seen: set[str] = set()
    while len(rows) < EXAMPLES_PER_TASK:
        question, answer, elaboration = _concise_question(rng)
        if question in seen:
            continue
        seen.add(question)
        rambling = " ".join([rng.choice(OPENERS), f"You asked: {question}", answer, elaboration, rng.choice(CLOSERS)])
        rows.append({
            "input": {"messages": [{"role": "system", "content": CONCISE_SYSTEM}, {"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": answer}],
            "non_preferred_output": [{"role": "assistant", "content": rambling}],
        })
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    write(HERE / "json-extract.jsonl", json_extract_examples(random.Random(SEED)))
    write(HERE / "pirate.jsonl", pirate_examples(random.Random(SEED + 1)))
    write(HERE / "tools.jsonl", tools_examples(random.Random(SEED + 2)))
    write(HERE / "concise.jsonl", concise_examples(random.Random(SEED + 2)))


if __name__ == "__main__":
    main()
