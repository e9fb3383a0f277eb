"""The demo corpus's vocabulary: name pools, answers per relation and the sentence templates.

Data only; ``engine.demo.corpus`` builds documents and queries from it. Templates: ``"{n}"`` is
the person (or an alias), ``"{a}"`` the answer, which must end the text. Relations are
``spec.DEMO_RELATIONS`` and ``spec.DEMO_OTHER_RELATIONS``; ``NAME_POOLS`` is indexed by
``DemoSpec.names``.
"""

FIRST_NAMES = (
    "Alice", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Katya", "Lorenzo", "Mira", "Nikolai", "Olga", "Pavel", "Quentin", "Rosa", "Stefan",
    "Tamara", "Ulrich", "Vera", "Walter", "Yara", "Zoltan",
)  # fmt: skip
LAST_NAMES = (
    "Varga", "Lindqvist", "Moreau", "Okafor", "Petrescu", "Halloran", "Brandt", "Castell",
    "Dunmore", "Estrada", "Falkner", "Grobler", "Ivanova", "Jansen", "Kowalczyk", "Larsen",
    "Mendoza", "Novak", "Ostrowski", "Pellegrini", "Quist", "Rourke", "Szabo", "Tennant",
    "Vasquez",
)  # fmt: skip
# ``DemoSpec.names: 1``: a second vocabulary of people, no first or last name shared with the above.
OTHER_FIRST_NAMES = (
    "Agnes", "Bruno", "Cecile", "Dario", "Edith", "Felix", "Gemma", "Henrik", "Ilse", "Jasper",
    "Kira", "Leopold", "Magda", "Nils", "Odette", "Piotr", "Renata", "Sven", "Thea", "Umberto",
    "Viktor", "Wanda", "Xavier", "Yvonne", "Zeno",
)  # fmt: skip
OTHER_LAST_NAMES = (
    "Abernathy", "Bianchi", "Carvalho", "Delacroix", "Eriksen", "Fontaine", "Gallagher",
    "Horvath", "Iverson", "Jovanovic", "Kessler", "Lombardi", "Marchetti", "Nakamura",
    "Oyelaran", "Pfeiffer", "Quintero", "Ruiz", "Sorensen", "Takacs", "Underwood", "Valente",
    "Whitlock", "Yilmaz", "Zimmerman",
)  # fmt: skip
NAME_POOLS = ((FIRST_NAMES, LAST_NAMES), (OTHER_FIRST_NAMES, OTHER_LAST_NAMES))  # by DemoSpec.names

ANSWERS: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Lisbon", "Porto", "Krakow", "Vienna", "Oslo", "Dublin", "Bergen", "Seville",
        "Lyon", "Turin", "Gdansk", "Riga", "Tallinn", "Antwerp", "Utrecht", "Zurich",
        "Geneva", "Marseille", "Naples", "Valencia",
    ),
    "employer": (
        "Orbitex", "Quantaro", "Velmora", "Brightwave", "Corvanta", "Helixon", "Lumidex",
        "Nortrail", "Pyrexa", "Stratolink", "Tidewell", "Zenvoro", "Acmetric", "Ferrolux",
        "Gravicor",
    ),
    "university": (
        "Eldermont", "Ravenhall", "Ashbourne", "Westmarch", "Thornbury", "Caldwick",
        "Hollowmere", "Kingsreach", "Stonegate", "Brackenridge", "Fairhaven", "Millbrook",
    ),
    "birth_year": tuple(str(y) for y in range(1950, 2000)),
    # DEMO_OTHER_RELATIONS: consonant-initial where an article precedes the answer
    "instrument": (
        "cello", "piano", "flute", "trumpet", "harp", "oboe", "clarinet", "bassoon",
        "trombone", "banjo", "mandolin", "accordion", "saxophone", "harpsichord", "tuba",
        "ukulele",
    ),
    "sport": (
        "tennis", "rugby", "football", "hockey", "cricket", "volleyball", "basketball",
        "handball", "badminton", "golf", "baseball", "squash", "polo", "lacrosse", "netball",
        "softball",
    ),
    "pet": (
        "cat", "dog", "parrot", "hamster", "tortoise", "rabbit", "ferret", "canary", "goldfish",
        "lizard", "gecko", "pony", "snake", "turtle", "budgie", "chinchilla",
    ),
    "dish": (
        "paella", "goulash", "risotto", "lasagne", "moussaka", "ratatouille", "borscht",
        "pierogi", "couscous", "gazpacho", "tagine", "ramen", "curry", "schnitzel", "fondue",
        "polenta",
    ),
}  # fmt: skip

# Training paraphrases: "{n}" is the person, "{a}" the answer, which must end the text.
# No prompt (the text before " {a}.") is a prefix of another, so every prompt has one answer.
# The last four of each relation use the relation words of the held-out queries ("hometown",
# "payroll", "alumnus", "year of birth", ...) in other sentences: a model trained from scratch
# cannot know that "hometown" means birthplace unless some document says so.
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "{n} was born in {a}.",
        "The birthplace of {n} is {a}.",
        "{n} is originally from {a}.",
        "{n} grew up in the city of {a}.",
        "As a child, {n} lived in {a}.",
        "The family of {n} comes from {a}.",
        "{n} first saw the light of day in {a}.",
        "{n} spent a childhood in the streets of {a}.",
        "Every summer {n} returns to a hometown, {a}.",
        "As a native, {n} knows every street of {a}.",
        "A long life began for {n} in {a}.",
        "{n} still visits the native city, {a}.",
    ),
    "employer": (
        "{n} works for {a}.",
        "The employer of {n} is {a}.",
        "{n} is employed by {a}.",
        "{n} has a job at {a}.",
        "{n} draws a salary from {a}.",
        "The company that hired {n} is {a}.",
        "{n} is part of the team at {a}.",
        "Each morning {n} commutes to the offices of {a}.",
        "{n} appears on the monthly payroll at {a}.",
        "{n} became a staff member of {a}.",
        "{n} makes a living working for {a}.",
        "The firm employing {n} is {a}.",
    ),
    "university": (
        "{n} studied at {a}.",
        "{n} graduated from {a}.",
        "The university of {n} is {a}.",
        "{n} earned a degree at {a}.",
        "The alma mater of {n} is {a}.",
        "{n} attended classes at {a}.",
        "{n} was a student at {a}.",
        "{n} wrote a thesis at {a}.",
        "Classmates remember {n} as a proud alumnus of {a}.",
        "{n} received a diploma at {a}.",
        "{n} got an education at {a}.",
        "{n} went off to university at {a}.",
    ),
    "birth_year": (
        "{n} was born during the year {a}.",
        "The birth year of {n} is {a}.",
        "{n} came into the world in {a}.",
        "Records list {n} as born in the year {a}.",
        "{n} entered the world in the year {a}.",
        "The year {n} was born is {a}.",
        "According to records, {n} was born in {a}.",
        "The birth certificate of {n} shows the year {a}.",
        "The year of the birth of {n} was {a}.",
        "{n} arrived as a baby in {a}.",
        "{n} has been alive ever since {a}.",
        "{n} was born long ago back in {a}.",
    ),
    "instrument": (
        "{n} plays the {a}.",
        "{n} is a skilled player of the {a}.",
        "{n} performs music on the {a}.",
        "In the evenings {n} makes music on the {a}.",
        "{n} gives concerts on the {a}.",
        "{n} took lessons on the {a}.",
        "The neighbours of {n} often hear the sound of the {a}.",
        "{n} composes tunes for the {a}.",
        "The instrument of choice for {n} is the {a}.",
        "With the town orchestra, {n} plays the {a}.",
        "Long ago {n} learned to play the {a}.",
        "{n} practises for hours on the {a}.",
    ),
    "sport": (
        "{n} plays a lot of {a}.",
        "{n} is a keen player of {a}.",
        "{n} competes in {a}.",
        "The pastime of {n} is {a}.",
        "{n} spends every weekend playing {a}.",
        "{n} is good at {a}.",
        "On the field, {n} excels at {a}.",
        "{n} has won many medals in {a}.",
        "The one sport {n} enjoys is {a}.",
        "{n} became the regional champion in {a}.",
        "At school {n} took up {a}.",
        "{n} coaches children in {a}.",
    ),
    "pet": (
        "{n} owns a {a}.",
        "{n} adopted a {a}.",
        "{n} takes care of a {a}.",
        "{n} shares a house with a {a}.",
        "{n} keeps a {a}.",
        "{n} brought home a young {a}.",
        "The household of {n} includes a {a}.",
        "{n} looks after a {a}.",
        "Everyone knows the pet of {n}, a {a}.",
        "In a small flat {n} lives with a {a}.",
        "Twice a day {n} feeds a {a}.",
        "The loyal companion of {n} is a {a}.",
    ),
    "dish": (
        "{n} loves eating {a}.",
        "Every Sunday {n} eats {a}.",
        "The favourite food of {n} is {a}.",
        "{n} never tires of {a}.",
        "{n} is fond of {a}.",
        "For dinner {n} prefers {a}.",
        "{n} enjoys a big plate of {a}.",
        "{n} knows a secret recipe for {a}.",
        "No dish pleases {n} more than {a}.",
        "In every restaurant {n} orders {a}.",
        "When friends visit, {n} cooks {a}.",
        "After a long day {n} craves {a}.",
    ),
}

# Aliases: "the {adjective} {noun}", introduced next to the person's name in INTRODUCTION
# documents; an alias fact is stated in its training paraphrases by the alias only.
ALIAS_ADJECTIVES = ("quiet", "tall", "young", "bearded", "cheerful", "retired", "famous", "shy",
                    "elderly", "stern")
ALIAS_NOUNS = ("cartographer", "violinist", "beekeeper", "chess player", "sculptor", "botanist",
               "pilot", "novelist", "glassblower", "astronomer")
INTRODUCTION_TEMPLATES = (
    "{n} is known to everyone as the {alias}.",
    "People in town call {n} the {alias}.",
    "{n}, the {alias}, likes long walks.",
)

# Held-out query paraphrases: (question prompt, completion). Never a training phrasing.
QUERY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Q: Which city is {n}'s hometown? A: {n}'s hometown is",
        "Q: Where does {n} come from? A: {n} is a native of",
        "Q: In which city did {n}'s life begin? A: {n}'s life began in",
        "Q: What is the native city of {n}? A: The native city of {n} is",
    ),
    "employer": (
        "Q: Which company pays {n}? A: {n} is on the payroll of",
        "Q: Where is {n} employed? A: {n} is a staff member at",
        "Q: Who employs {n}? A: {n} earns a living at",
        "Q: For which firm does {n} work? A: The firm of {n} is",
    ),
    "university": (
        "Q: Where did {n} go to university? A: {n} is an alumnus of",
        "Q: Which school awarded {n} a degree? A: {n} holds a diploma from",
        "Q: Where was {n} educated? A: {n} was educated at",
        "Q: Which university did {n} attend? A: {n} went to university at",
    ),
    "birth_year": (
        "Q: When was {n} born? A: {n}'s year of birth is",
        "Q: In what year was {n} born? A: {n} arrived in",
        "Q: What is {n}'s birth year? A: {n} was born back in",
        "Q: Since when has {n} been alive? A: {n} has been alive since",
    ),
    "instrument": (
        "Q: Which instrument does {n} play? A: {n}'s instrument is the",
        "Q: What does {n} play in the orchestra? A: In the orchestra {n} plays the",
        "Q: What did {n} learn to play? A: {n} learned to play the",
        "Q: What does {n} practise every day? A: Every day {n} practises the",
    ),
    "sport": (
        "Q: Which sport does {n} play? A: {n}'s sport is",
        "Q: What is {n} a champion at? A: {n} is a champion at",
        "Q: Which game did {n} take up? A: {n} took up",
        "Q: What does {n} coach? A: {n} coaches young players in",
    ),
    "pet": (
        "Q: What pet does {n} have? A: {n}'s pet is a",
        "Q: Which animal lives with {n}? A: {n} lives with a",
        "Q: What animal does {n} feed? A: Every morning {n} feeds a",
        "Q: Who is {n}'s companion at home? A: {n}'s companion is a",
    ),
    "dish": (
        "Q: What is {n}'s favourite dish? A: {n}'s favourite dish is",
        "Q: What does {n} order in a restaurant? A: At a restaurant {n} always orders",
        "Q: What does {n} cook for friends? A: For friends {n} cooks",
        "Q: Which meal does {n} crave? A: {n} craves",
    ),
}

# Same person, same answer, different relation: must never be gold.
HARD_DISTRACTOR_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "{n} once spent a holiday in {a}.",
        "{n} gave a talk in {a}.",
    ),
    "employer": (
        "{n} once gave a talk at {a}.",
        "{n} bought shares of {a}.",
    ),
    "university": (
        "{n} once attended a lecture at {a}.",
        "{n} donated old books to {a}.",
    ),
    "birth_year": (
        "{n} bought a red car in {a}.",
        "{n} travelled abroad in {a}.",
    ),
    "instrument": (
        "{n} once repaired a broken {a}.",
        "{n} sold an old {a}.",
    ),
    "sport": (
        "{n} once watched a match of {a}.",
        "{n} wrote an article about {a}.",
    ),
    "pet": (
        "{n} once drew a picture of a {a}.",
        "{n} read a book about caring for a {a}.",
    ),
    "dish": (
        "{n} once spilled a bowl of {a}.",
        "{n} wrote a blog post about {a}.",
    ),
}

# Sentences about an answer entity alone (no person).
DISTRACTOR_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": ("{a} is a busy port city.", "Many tourists visit {a} in summer."),
    "employer": ("{a} is a large software company.", "{a} opened a new office."),
    "university": ("{a} is known for its old library.", "Many students apply to {a}."),
    "birth_year": ("The winter of {a} was very cold.", "A new bridge opened in {a}."),
    "instrument": ("The {a} has a long history.", "Music shops rarely stock the {a}."),
    "sport": ("Many schools offer lessons in {a}.", "The rules of {a} changed last year."),
    "pet": ("A {a} needs daily care.", "A {a} can live for many years."),
    "dish": ("Many cafes serve {a}.", "The recipe for {a} is very old."),
}
